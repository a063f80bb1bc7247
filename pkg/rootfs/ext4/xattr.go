package ext4

import (
	"archive/tar"
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
)

const (
	// xattrListEnd is the four zero bytes that end a list of entries.
	xattrListEnd = 4
	// ibodyXattrSpace is what a 256-byte inode has left for attributes
	// after the extra fields and the in-inode header.
	ibodyXattrSpace = inodeSize - goodOldInodeSize - extraIsize - ibodyHeaderSize
	// maxXattrRefcount is EXT4_XATTR_REFCOUNT_MAX, the kernel's cap on the
	// number of inodes that share one attribute block.
	maxXattrRefcount = 1024
)

// xattr is one extended attribute in on-disk form. The name's prefix is
// replaced by its index, and ACL values are already in the ext4 encoding.
type xattr struct {
	index uint8
	name  string
	value []byte
}

func (x xattr) entrySize() int { return (eName + len(x.name) + 3) &^ 3 }
func (x xattr) valueSize() int { return (len(x.value) + 3) &^ 3 }
func (x xattr) size() int      { return x.entrySize() + x.valueSize() }

// compareXattr is the order the kernel expects in xattr blocks: by index,
// then name length, then name. The kernel relies on it to stop searching
// early.
func compareXattr(a, b xattr) int {
	return cmp.Or(cmp.Compare(a.index, b.index), cmp.Compare(len(a.name), len(b.name)), strings.Compare(a.name, b.name))
}

// tarXattrs extracts extended attributes from PAX records. It reads two
// forms. GNU tar, Go and the container tool chain write
// SCHILY.xattr.<name>, and libarchive writes LIBARCHIVE.xattr.<urlencoded
// name> with a base64 value. Attributes in namespaces that ext4 on Linux
// cannot store are skipped and counted, as container runtimes do when
// extracting.
func tarXattrs(hdr *tar.Header) (xs []xattr, skipped int, err error) {
	raw := map[string][]byte{}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "LIBARCHIVE.xattr."); ok {
			name, err1 := url.PathUnescape(name)
			val, err2 := base64.StdEncoding.DecodeString(v)
			if err := errors.Join(err1, err2); err != nil {
				return nil, 0, fmt.Errorf("bad PAX record %q: %w", k, err)
			}
			if _, dup := raw[name]; !dup {
				raw[name] = val
			}
		}
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			raw[name] = []byte(v) // preferred over the libarchive copy
		}
	}
	for name, value := range raw {
		x, ok, err := toDiskXattr(name, value)
		if err != nil {
			return nil, 0, fmt.Errorf("xattr %q: %w", name, err)
		}
		if !ok {
			skipped++
			continue
		}
		xs = append(xs, x)
	}
	slices.SortFunc(xs, compareXattr)
	return xs, skipped, nil
}

// toDiskXattr maps a full attribute name to ext4's form, an index plus the
// rest of the name. ok is false for empty names and for namespaces that
// ext4 has no index for, which the kernel would refuse too.
func toDiskXattr(name string, value []byte) (x xattr, ok bool, err error) {
	switch {
	case name == "system.posix_acl_access":
		x.index = ext4XattrIndexPosixACLAccess
	case name == "system.posix_acl_default":
		x.index = ext4XattrIndexPosixACLDefault
	case strings.HasPrefix(name, "user."):
		x.index, x.name = ext4XattrIndexUser, name[len("user."):]
	case strings.HasPrefix(name, "trusted."):
		x.index, x.name = ext4XattrIndexTrusted, name[len("trusted."):]
	case strings.HasPrefix(name, "security."):
		x.index, x.name = ext4XattrIndexSecurity, name[len("security."):]
	default:
		return x, false, nil
	}
	if x.name == "" && x.index != ext4XattrIndexPosixACLAccess && x.index != ext4XattrIndexPosixACLDefault {
		return x, false, nil
	}
	if len(x.name) > 255 {
		return x, false, errors.New("name longer than 255 bytes")
	}
	// A copy: the name shares the tar reader's PAX block (up to 1 MiB),
	// which the inode would keep alive until Finish.
	x.name = strings.Clone(x.name)
	x.value = value
	if x.index == ext4XattrIndexPosixACLAccess || x.index == ext4XattrIndexPosixACLDefault {
		v, err := aclToDisk(value)
		if err != nil {
			return x, false, err
		}
		x.value = v
	}
	if x.size()+xattrListEnd > blockSize-xattrHeaderSize {
		return x, false, fmt.Errorf("value of %d bytes does not fit in an xattr block", len(value))
	}
	return x, true, nil
}

// POSIX ACL tags.
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

// ACL format versions: the xattr interface (POSIX_ACL_XATTR_VERSION) and
// ext4's on-disk form (EXT4_ACL_VERSION).
const (
	posixACLXattrVersion = 2
	ext4ACLVersion       = 1
)

// aclToDisk converts a POSIX ACL from the xattr interface format to the ext4
// on-disk format. In the interface format every entry has 8 bytes. On disk,
// only ACL_USER and ACL_GROUP entries carry a qualifier id (a uid or gid),
// and the other entries take 4 bytes.
func aclToDisk(v []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || (len(v)-4)%8 != 0 || le.Uint32(v) != posixACLXattrVersion {
		return nil, errors.New("malformed POSIX ACL")
	}
	out := le.AppendUint32(nil, ext4ACLVersion)
	for p := v[4:]; len(p) > 0; p = p[8:] {
		// struct posix_acl_xattr_entry: e_tag, e_perm, e_id.
		tag, perm, id := le.Uint16(p), le.Uint16(p[2:]), le.Uint32(p[4:])
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		switch tag {
		case aclUser, aclGroup:
			out = le.AppendUint32(out, id)
		case aclUserObj, aclGroupObj, aclMask, aclOther:
		default:
			return nil, fmt.Errorf("unknown POSIX ACL tag %#x", tag)
		}
	}
	return out, nil
}

// splitXattrs decides which attributes live in the inode body and which in
// an external block. The smallest go into the inode first, so that a single
// large attribute cannot push the small, frequently read ones
// (security.capability, security.selinux) out of the inode.
func splitXattrs(xs []xattr) (ibody, block []xattr) {
	bySize := slices.Clone(xs)
	slices.SortStableFunc(bySize, func(a, b xattr) int { return cmp.Compare(a.size(), b.size()) })
	free := ibodyXattrSpace - xattrListEnd
	for _, x := range bySize {
		if x.size() <= free {
			ibody = append(ibody, x)
			free -= x.size()
		} else {
			block = append(block, x)
		}
	}
	slices.SortFunc(ibody, compareXattr)
	slices.SortFunc(block, compareXattr)
	return ibody, block
}

// encodeXattrs lays out entries from offset first onwards, and values from
// the end of dst downwards. Value offsets (e_value_offs) are relative to
// dst. In the inode, dst starts at the first entry, and in a block, dst is
// the whole block, which is what the format wants in both cases. dst must
// be zeroed, and callers guarantee that the attributes fit.
func encodeXattrs(dst []byte, first int, xs []xattr) {
	le := binary.LittleEndian
	pos, end := first, len(dst)
	for _, x := range xs {
		e := dst[pos:]
		e[eNameLen] = uint8(len(x.name))
		e[eNameIndex] = x.index
		if len(x.value) > 0 {
			end -= x.valueSize()
			copy(dst[end:], x.value)
			le.PutUint16(e[eValueOffs:], uint16(end))
		}
		le.PutUint32(e[eValueSize:], uint32(len(x.value)))
		le.PutUint32(e[eHash:], xattrEntryHash(x))
		copy(e[eName:], x.name)
		pos += x.entrySize()
	}
}

// xattrEntryHash is ext4's entry hash (e_hash). It is a rotate-xor over the
// name bytes, then over the value as little-endian 32-bit words. Name bytes
// are taken as unsigned, which is the documented form that current kernels
// and e2fsprogs check.
func xattrEntryHash(x xattr) uint32 {
	var h uint32
	for i := 0; i < len(x.name); i++ {
		h = h<<5 ^ h>>27 ^ uint32(x.name[i])
	}
	var word [4]byte
	for p := x.value; len(p) > 0; {
		n := copy(word[:], p)
		clear(word[n:])
		h = h<<16 ^ h>>16 ^ binary.LittleEndian.Uint32(word[:])
		p = p[n:]
	}
	return h
}

// xattrBlock is an external attribute block, possibly shared by several
// inodes with identical attributes.
type xattrBlock struct {
	body     []byte // block content without refcount and checksum
	refcount uint32
	blk      uint64
}

// newXattrBlockBody encodes an attribute block for xs, without the refcount
// and the checksum.
func newXattrBlockBody(xs []xattr) []byte {
	b := make([]byte, blockSize)
	le := binary.LittleEndian
	le.PutUint32(b[hMagic:], ext4XattrMagic)
	le.PutUint32(b[hBlocks:], 1)
	encodeXattrs(b, xattrHeaderSize, xs)
	// The block hash (h_hash) folds the entry hashes together.
	var h uint32
	for p := b[xattrHeaderSize:]; le.Uint32(p) != 0; p = p[(eName+int(p[eNameLen])+3)&^3:] {
		h = h<<16 ^ h>>16 ^ le.Uint32(p[eHash:])
	}
	le.PutUint32(b[hHash:], h)
	return b
}

// encodeXattrBlock returns the final block, with the refcount and the
// checksum filled in. The checksum covers the block number, so that a write
// to the wrong block is caught.
func (c checksummer) encodeXattrBlock(x *xattrBlock) []byte {
	b := bytes.Clone(x.body)
	le := binary.LittleEndian
	le.PutUint32(b[hRefcount:], x.refcount)
	crc := c.sum(c.seed, le.AppendUint64(nil, x.blk))
	le.PutUint32(b[hChecksum:], c.sum(crc, b))
	return b
}
