package ext4

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"
)

// sparseBase is a base file of size bytes whose first bytes are data and
// the rest zeros, as the holes of a real base read. It fails the test on a
// read past size: the parser must stay inside the file whatever its bytes
// claim.
type sparseBase struct {
	t    testing.TB
	data []byte
	size int64
}

func (r *sparseBase) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > r.size || int64(len(p)) > r.size-off {
		r.t.Fatalf("read of %d bytes at %d outside a %d-byte base", len(p), off, r.size)
	}
	clear(p)
	if off < int64(len(r.data)) {
		copy(p, r.data[off:])
	}
	return len(p), nil
}

// resealBase recomputes the checksums a mutation broke: the superblock's
// and those of the descriptors in block 1, so that the fuzzer gets past
// them to the checks of the fields themselves.
func resealBase(d []byte) {
	resealSuperblock(d)
	if len(d) < 2*blockSize {
		return
	}
	var uuid [16]byte
	copy(uuid[:], d[superblockOffset+sUUID:])
	c := newChecksummer(uuid)
	for grp := range descsPerBlock {
		raw := d[blockSize+grp*descSize : blockSize+(grp+1)*descSize]
		binary.LittleEndian.PutUint16(raw[bgChecksum:], c.descChecksum(raw, uint32(grp)))
	}
}

// fuzzSeedBase builds a base whose metadata sits in its first blocks (small
// limits reserve a one-block descriptor table) and returns those blocks
// and the base's size in blocks.
func fuzzSeedBase(f *testing.F, opts Options, prefixBlocks int) ([]byte, uint32) {
	opts.MaxTotalBytes, opts.MaxFiles = 1<<20, 64
	opts.Time, opts.UUID = time.Unix(1720000000, 0), [16]byte{9}
	img, st := mustBuild(f, opts, []tentry{dirE("etc", 0o755), symlinkE("bin", "usr/bin"), fileE("etc/a", 0o644, nil)})
	data, err := os.ReadFile(img)
	if err != nil {
		f.Fatal(err)
	}
	prefix := data[:prefixBlocks*blockSize]
	if _, err := readBase(&sparseBase{t: f, data: prefix, size: st.ImageBytes}, st.ImageBytes); err != nil {
		f.Fatalf("the seed's metadata is not all in its first %d blocks: %v", prefixBlocks, err)
	}
	return prefix, uint32(st.ImageBytes / blockSize)
}

// patchBase applies patches to a copy of template: each 3 bytes are a
// little-endian 16-bit offset (taken modulo the template's length) and the
// byte to store there.
func patchBase(template, patches []byte) []byte {
	d := append([]byte(nil), template...)
	for i := 0; i+3 <= len(patches); i += 3 {
		off := int(binary.LittleEndian.Uint16(patches[i:])) % len(d)
		d[off] = patches[i+2]
	}
	return d
}

// FuzzReadBase feeds readBase and PlanGrow base files. With template 0 the
// input is the start of the file itself; with 1 or 2 it is a few byte
// patches over the metadata blocks of a real base (one group, or three),
// which keeps inputs small and mutations in the fields that matter. reseal
// recomputes the checksums a patch broke, to get past them.
func FuzzReadBase(f *testing.F) {
	one, oneBlocks := fuzzSeedBase(f, Options{}, 3)                       // superblock, table, bitmap of group 0
	three, threeBlocks := fuzzSeedBase(f, Options{MinSize: 300 << 20}, 5) // and bitmaps of groups 1 and 2
	templates := [][]byte{nil, one, three}
	f.Add(uint8(0), one, false, oneBlocks, uint32(20<<18))
	f.Add(uint8(0), three, false, threeBlocks, uint32(100))
	f.Add(uint8(0), []byte{}, false, uint32(0), uint32(0))
	f.Add(uint8(1), []byte{}, false, oneBlocks, uint32(20<<18))
	f.Add(uint8(2), []byte{}, true, threeBlocks, uint32(5<<18))
	// The last group's block bitmap pointer, moved.
	lastBitmap := binary.LittleEndian.AppendUint16(nil, blockSize+2*descSize+bgBlockBitmapLo)
	f.Add(uint8(2), append(lastBitmap, 7), true, threeBlocks, uint32(100))

	f.Fuzz(func(t *testing.T, template uint8, data []byte, reseal bool, fileBlocks, growBlocks uint32) {
		if tpl := templates[int(template)%len(templates)]; tpl != nil {
			data = patchBase(tpl, data)
		} else {
			data = append([]byte(nil), data...)
		}
		if reseal {
			resealBase(data)
		}
		size := int64(fileBlocks) * blockSize
		if fileBlocks == 0 {
			size = int64(len(data))
		}
		r := &sparseBase{t: t, data: data, size: size}
		b, err := readBase(r, size)
		if err != nil {
			// Reads never fail, so every refusal is about the bytes.
			if !errors.Is(err, ErrNotGrowable) || b != nil {
				t.Fatalf("err = %v, base %v: want ErrNotGrowable and no base", err, b)
			}
			return
		}
		if b.blocks*blockSize != uint64(size) || b.groups != ceilDiv(b.blocks, blocksPerGroup) ||
			uint64(len(b.gdt)) != b.gdtBlocks*blockSize || len(b.lastBitmap) != blockSize {
			t.Fatalf("inconsistent base: %d blocks, %d groups, %d table bytes for a %d-byte file", b.blocks, b.groups, len(b.gdt), size)
		}
		if b.freeBlocks > b.blocks || b.freeInodes > b.groups*b.ipg {
			t.Fatalf("more free than there is: %d of %d blocks, %d of %d inodes", b.freeBlocks, b.blocks, b.freeInodes, b.groups*b.ipg)
		}
		// At most 64 GiB more, so that one run stays fast.
		newSize := uint64(size) + uint64(growBlocks%(16<<20))*blockSize
		p, err := PlanGrow(r, size, newSize)
		if err != nil {
			if errors.Is(err, ErrNotGrowable) {
				t.Fatalf("PlanGrow refuses the base readBase accepted: %v", err)
			}
			return // too many inodes for the new size
		}
		checkPlanShape(t, p, uint64(size))
		if p.Blocks < b.blocks || p.Size > newSize || p.FreeBlocks < b.freeBlocks || p.FreeInodes < b.freeInodes {
			t.Fatalf("the plan shrinks something: %s from %d blocks (%d free)", p.counts(), b.blocks, b.freeBlocks)
		}
		if p.Blocks == b.blocks && len(p.Writes) != 0 {
			t.Fatalf("%d writes without growth", len(p.Writes))
		}
	})
}
