package ext4

import (
	"errors"
	"hash/maphash"
)

// The merged tree is kept in a few large, pointer-free arrays rather than
// one heap object per name. An image may hold a million entries, and all
// of them stay in memory until Finish: per-object headers, size-class
// rounding, per-directory maps and pointers for the garbage collector to
// trace would cost several times the data itself.

// storeChunk is the number of elements in one chunk of a store.
const storeChunk = 1 << 12

// store is a growable array of T addressed by 32-bit index. It grows by
// whole chunks, which never move, so a *T stays valid while the store
// grows, and growing never copies what is already there. Index 0 is a
// placeholder, so that 0 can mean "none".
type store[T any] struct {
	chunks [][]T
	n      uint32
}

func (s *store[T]) at(i uint32) *T { return &s.chunks[i/storeChunk][i%storeChunk] }

// add appends v and returns its index.
func (s *store[T]) add(v T) uint32 {
	if s.n == 0 {
		s.chunks = append(s.chunks, make([]T, storeChunk))
		s.n = 1
	}
	if s.n%storeChunk == 0 {
		s.chunks = append(s.chunks, make([]T, storeChunk))
	}
	i := s.n
	*s.at(i) = v
	s.n++
	return i
}

// nameArena holds names (1 to 255 bytes) back to back in chunks that
// never move. A name is its offset; its length is kept by the caller.
type nameArena struct {
	chunks [][]byte
}

const (
	nameChunkBits = 20 // 1 MiB chunks
	nameChunk     = 1 << nameChunkBits
)

var errNamesFull = errors.New("names of the entries exceed 4 GiB")

// add copies name into the arena and returns its offset. Copying keeps
// the arena's memory exact: the tar reader's strings would keep the whole
// header, or a PAX block of up to 1 MiB, alive for each name.
func (a *nameArena) add(name string) (uint32, error) {
	k := len(a.chunks) - 1
	if k < 0 || len(a.chunks[k])+len(name) > nameChunk {
		if len(a.chunks) == 1<<(32-nameChunkBits) {
			return 0, errNamesFull
		}
		a.chunks = append(a.chunks, make([]byte, 0, nameChunk))
		k++
	}
	off := uint32(k)<<nameChunkBits | uint32(len(a.chunks[k]))
	a.chunks[k] = append(a.chunks[k], name...)
	return off, nil
}

func (a *nameArena) get(off uint32, n uint8) []byte {
	c := a.chunks[off>>nameChunkBits]
	i := off & (nameChunk - 1)
	return c[i : i+uint32(n) : i+uint32(n)]
}

// childIndex finds a node by its parent and name: one open-addressing hash
// table (linear probing) for the whole tree, holding only node indexes.
// The hash seed is random, so an image cannot be crafted to make lookups
// collide; it only affects lookups, never the image.
type childIndex struct {
	slots []nodeID // 0 is an empty slot
	count int
	seed  maphash.Seed
}

func newChildIndex() childIndex {
	return childIndex{slots: make([]nodeID, 1024), seed: maphash.MakeSeed()}
}

// mix combines a name's hash with its parent (the splitmix64 finaliser,
// so that the parent reaches the low bits).
func mix(nameHash uint64, parent nodeID) uint64 {
	h := nameHash + uint64(parent)*0x9e3779b97f4a7c15
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	return h ^ h>>31
}

// home is the slot where the probe for id starts. maphash hashes a string
// and a []byte with the same bytes alike.
func (x *childIndex) home(t *tree, id nodeID) int {
	n := t.node(id)
	return int(mix(maphash.Bytes(x.seed, t.name(n)), n.parent) & uint64(len(x.slots)-1))
}

// find returns the node named name in parent, or 0, and the slot where it
// is or would go.
func (x *childIndex) find(t *tree, parent nodeID, name string) (int, nodeID) {
	mask := len(x.slots) - 1
	for i := int(mix(maphash.String(x.seed, name), parent) & uint64(mask)); ; i = (i + 1) & mask {
		id := x.slots[i]
		if id == 0 {
			return i, 0
		}
		if n := t.node(id); n.parent == parent && string(t.name(n)) == name {
			return i, id
		}
	}
}

// insert adds id, whose name must not be in its parent yet.
func (x *childIndex) insert(t *tree, id nodeID) {
	if (x.count+1)*4 > len(x.slots)*3 {
		old := x.slots
		x.slots = make([]nodeID, 2*len(old))
		for _, o := range old {
			if o != 0 {
				x.place(t, o)
			}
		}
	}
	x.place(t, id)
	x.count++
}

func (x *childIndex) place(t *tree, id nodeID) {
	mask := len(x.slots) - 1
	i := x.home(t, id)
	for x.slots[i] != 0 {
		i = (i + 1) & mask
	}
	x.slots[i] = id
}

// delete removes id. Later members of its probe run move back, so that
// lookups never need tombstones.
func (x *childIndex) delete(t *tree, id nodeID) {
	n := t.node(id)
	i, found := x.find(t, n.parent, string(t.name(n)))
	if found != id {
		panic("ext4: deleting a name that is not indexed")
	}
	mask := len(x.slots) - 1
	for j := (i + 1) & mask; x.slots[j] != 0; j = (j + 1) & mask {
		// The member at j may fill the hole at i unless its home lies
		// cyclically in (i, j].
		if h := x.home(t, x.slots[j]); (j-h)&mask >= (j-i)&mask {
			x.slots[i] = x.slots[j]
			i = j
		}
	}
	x.slots[i] = 0
	x.count--
}
