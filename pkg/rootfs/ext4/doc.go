// Package ext4 builds a raw ext4 filesystem image straight from the tar
// layers of an OCI image. It extracts nothing to a directory and needs no
// e2fsprogs at run time.
//
// # Usage
//
//	w, err := ext4.NewWriter(f, ext4.Options{Headroom: 1 << 30})
//	for _, layer := range layers { // lowest layer first
//		err = w.ApplyLayer(ctx, decompressed(layer)) // the layer's tar stream
//	}
//	stats, err := w.Finish(ctx)
//
// Layers are merged with the OCI "Representing Changes" rules: whiteouts,
// opaque directories, and replacement of paths by later layers. Regular
// file contents go to their final place in the image the moment they are
// read. Everything else (inodes, directories, bitmaps, the journal) is kept
// in memory and written by Finish.
//
// # Memory
//
// The merged tree lives in a few large arrays without pointers (store.go):
// a 64-byte inode and a 32-byte node per name, the names packed into one
// arena, and one hash index of 4-byte slots that finds a child by parent
// and name. An entry costs about 120 bytes until Finish, plus its symlink
// target and xattrs, so an image at DefaultMaxFiles holds about 120 MiB.
// Options.MaxFiles bounds the entries, and Options.MaxTotalBytes every
// byte the layer streams hold.
//
// # Layout
//
// The total size is unknown while streaming, so the image is laid out as
// follows.
//
//	block 0            primary superblock
//	blocks 1..R        group descriptor table, reserved for the largest image
//	                   the Options limits allow (the unused tail stays free)
//	R+1 ..             file data, allocated strictly sequentially
//	after the data     block bitmaps, inode bitmaps, inode tables,
//	                   directories, long symlinks, xattr blocks, journal,
//	                   extent-tree blocks (placed by Finish)
//	then               free space, at least Options.Headroom bytes
//
// The flex_bg feature is what makes this legal, because it lets a group's
// bitmaps and inode table live anywhere in the filesystem. sparse_super
// puts superblock and descriptor backups at the start of group 1 and of
// every group that is a power of 3, 5 or 7, and the allocator skips those
// areas.
//
// Blocks freed by a later layer are never reused, because reuse would break
// sequential streaming. They are left free and punched out of the file, so
// data deleted by an upper layer is neither stored nor visible to the guest
// through the raw disk. Blocks that are entirely zero inside a regular file
// become holes, and metadata that is never written (unused inode-table
// slots, the journal body) stays sparse.
//
// # Feature set
//
//	compat      has_journal, ext_attr, dir_index
//	incompat    filetype, extent, 64bit, flex_bg
//	ro_compat   sparse_super, large_file, huge_file, dir_nlink,
//	            extra_isize, metadata_csum
//
// This is mke2fs 1.47's default "ext4" set with three changes. It leaves
// out resize_inode, which needs a special inode whose layout only matters
// for offline growth (the kernel can grow a filesystem online without it).
// It leaves out orphan_file, which only Linux 5.15 and later support. And
// it adds 64bit descriptors, so that bitmap checksums are stored in full.
// Linux 4.x and later and e2fsprogs 1.43 and later support all of these
// read-write, so a 5.10 guest mounts the image read-write.
//
// metadata_csum (crc32c) is worth its cost. Every sandbox of an image shares
// one base disk, and checksums let the guest kernel detect corruption
// instead of propagating it.
//
// Directories are written as linear (non-htree) directories, which every
// ext4 reader accepts. dir_index is still advertised, so that the guest
// kernel indexes the directories it creates or grows.
//
// The superblock is written "clean", with no errors recorded and an empty
// journal (s_start = 0). The kernel therefore mounts it without recovery,
// and e2fsck -fn reports nothing.
//
// # Growth
//
// A box's overlay is larger than the shared base. PlanGrow (grow.go) lists
// the few blocks that, written into the overlay, grow the base's
// filesystem to the overlay's size, offline and without e2fsprogs. The
// base itself stays as it is: growth needs nothing of its layout beyond
// what the Writer already does.
//
// The base's last group is extended. Every group added keeps its bitmaps
// and inode table inside itself, past the end of the base, where the
// overlay reads zeros, and is flagged BLOCK_UNINIT, INODE_UNINIT and
// ITABLE_ZEROED, so none of that is written. The last group is the one
// exception: e2fsck wants its block bitmap on disk.
//
// The classic descriptor table cannot grow, because file data follows it.
// The reserved area after it is for streaming only, and copying a larger
// table into every sparse_super backup group would cost a block per 8 GiB
// per backup group. A filesystem that outgrows the table switches to
// meta_bg instead, with s_first_meta_bg = the table's size: each further
// 8 GiB meta-group keeps its one descriptor block in its first group, with
// copies in its second and last groups. That makes growth to 20 GiB about
// 30 block writes, to 100 GiB about 60 and to 1 TiB about 410. The guest can
// grow the result further with resize2fs, online or offline.
package ext4
