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
	xattrMagic      = 0xEA020000
	xattrHeaderSize = 32 // external block header
	xattrEntryHead  = 16 // fixed part of an entry, before the name
	// ibodyXattrSpace is what a 256-byte inode has left after the extra
	// fields and the 4-byte in-inode magic.
	ibodyXattrSpace = inodeSize - goodOldInodeSize - extraIsize - 4
	// maxXattrRefcount mirrors the kernel's cap on inodes sharing a block.
	maxXattrRefcount = 1024
)

// Attribute name indexes: ext4 stores a small number instead of the prefix.
const (
	xattrIndexUser       = 1
	xattrIndexACLAccess  = 2
	xattrIndexACLDefault = 3
	xattrIndexTrusted    = 4
	xattrIndexSecurity   = 6
)

// xattr is one extended attribute in on-disk form: prefix replaced by its
// index, ACL values already converted to the ext4 encoding.
type xattr struct {
	index uint8
	name  string
	value []byte
}

func (x xattr) entrySize() int { return (xattrEntryHead + len(x.name) + 3) &^ 3 }
func (x xattr) valueSize() int { return (len(x.value) + 3) &^ 3 }
func (x xattr) size() int      { return x.entrySize() + x.valueSize() }

// compareXattr is the order the kernel expects in xattr blocks (it stops
// searching early): index, then name length, then name.
func compareXattr(a, b xattr) int {
	return cmp.Or(cmp.Compare(a.index, b.index), cmp.Compare(len(a.name), len(b.name)), strings.Compare(a.name, b.name))
}

// tarXattrs extracts extended attributes from PAX records: the
// SCHILY.xattr.<name> form written by GNU tar, Go and the container
// tool chain, and libarchive's LIBARCHIVE.xattr.<urlencoded> form with
// base64 values. Namespaces a Linux ext4 cannot store are skipped and
// counted, as container runtimes do when extracting.
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

// toDiskXattr maps a full attribute name to ext4's index plus suffix form.
// ok is false for namespaces ext4 has no index for (the kernel would refuse
// them too) and for empty names.
func toDiskXattr(name string, value []byte) (x xattr, ok bool, err error) {
	switch {
	case name == "system.posix_acl_access":
		x.index = xattrIndexACLAccess
	case name == "system.posix_acl_default":
		x.index = xattrIndexACLDefault
	case strings.HasPrefix(name, "user."):
		x.index, x.name = xattrIndexUser, name[len("user."):]
	case strings.HasPrefix(name, "trusted."):
		x.index, x.name = xattrIndexTrusted, name[len("trusted."):]
	case strings.HasPrefix(name, "security."):
		x.index, x.name = xattrIndexSecurity, name[len("security."):]
	default:
		return x, false, nil
	}
	if x.name == "" && x.index != xattrIndexACLAccess && x.index != xattrIndexACLDefault {
		return x, false, nil
	}
	if len(x.name) > 255 {
		return x, false, errors.New("name longer than 255 bytes")
	}
	x.value = value
	if x.index == xattrIndexACLAccess || x.index == xattrIndexACLDefault {
		v, err := aclToDisk(value)
		if err != nil {
			return x, false, err
		}
		x.value = v
	}
	if x.size()+4 > blockSize-xattrHeaderSize {
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

// aclToDisk converts a POSIX ACL from the xattr interface format (version 2,
// 8 bytes per entry) to the ext4 on-disk format (version 1, where entries
// without a qualifier id are 4 bytes).
func aclToDisk(v []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || (len(v)-4)%8 != 0 || le.Uint32(v) != 2 {
		return nil, errors.New("malformed POSIX ACL")
	}
	out := le.AppendUint32(nil, 1)
	for p := v[4:]; len(p) > 0; p = p[8:] {
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
// an external block. Smallest first into the inode, so that a single large
// attribute does not push the small, hot ones (security.capability,
// security.selinux) out of the inode.
func splitXattrs(xs []xattr) (ibody, block []xattr) {
	bySize := slices.Clone(xs)
	slices.SortStableFunc(bySize, func(a, b xattr) int { return cmp.Compare(a.size(), b.size()) })
	free := ibodyXattrSpace - 4 // entry list terminator
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

// encodeXattrs lays out entries from offset first onwards and values from the
// end of dst downwards. Value offsets are relative to dst, which is what the
// inode body (dst starting at the first entry) and the block (dst = block)
// both want. dst must be zeroed; callers guarantee the attributes fit.
func encodeXattrs(dst []byte, first int, xs []xattr) {
	le := binary.LittleEndian
	pos, end := first, len(dst)
	for _, x := range xs {
		e := dst[pos:]
		e[0] = uint8(len(x.name))
		e[1] = x.index
		if len(x.value) > 0 {
			end -= x.valueSize()
			copy(dst[end:], x.value)
			le.PutUint16(e[2:], uint16(end))
		}
		le.PutUint32(e[8:], uint32(len(x.value)))
		le.PutUint32(e[12:], xattrEntryHash(x))
		copy(e[xattrEntryHead:], x.name)
		pos += x.entrySize()
	}
}

// xattrEntryHash is ext4's entry hash: a rotate-xor over the name bytes, then
// over the value as little-endian 32-bit words. Name bytes are taken as
// unsigned, the documented form that current kernels and e2fsprogs check.
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

func newXattrBlockBody(xs []xattr) []byte {
	b := make([]byte, blockSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], xattrMagic)
	le.PutUint32(b[8:], 1) // h_blocks
	encodeXattrs(b, xattrHeaderSize, xs)
	// The block hash folds the entry hashes together.
	var h uint32
	for p := b[xattrHeaderSize:]; le.Uint32(p) != 0; p = p[(xattrEntryHead+int(p[0])+3)&^3:] {
		h = h<<16 ^ h>>16 ^ le.Uint32(p[12:])
	}
	le.PutUint32(b[12:], h)
	return b
}

// encodeXattrBlock returns the final block: refcount and checksum filled in. The
// checksum covers the block number so that a misdirected write is caught.
func (c checksummer) encodeXattrBlock(x *xattrBlock) []byte {
	b := bytes.Clone(x.body)
	le := binary.LittleEndian
	le.PutUint32(b[4:], x.refcount)
	crc := c.sum(c.seed, le.AppendUint64(nil, x.blk))
	le.PutUint32(b[16:], c.sum(crc, b))
	return b
}
