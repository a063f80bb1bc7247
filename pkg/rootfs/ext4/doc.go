// Package ext4 builds a raw ext4 filesystem image straight from the tar
// layers of an OCI image, without extracting anything to a directory and
// without e2fsprogs at run time.
//
// # Usage
//
//	b, err := ext4.NewBuilder(f, ext4.Options{Headroom: 1 << 30})
//	for _, layer := range layers { // lowest layer first
//		err = b.ApplyLayer(ctx, tar.NewReader(decompressed(layer)))
//	}
//	stats, err := b.Finish(ctx)
//
// Layers are merged with the OCI "Representing Changes" rules (whiteouts,
// opaque directories, replacement of paths by later layers). Regular file
// contents go to their final place in the image the moment they are read;
// everything else (inodes, directories, bitmaps, the journal) is kept in
// memory and written by Finish.
//
// # Layout
//
// The total size is unknown while streaming, so the image is laid out as:
//
//	block 0            primary superblock
//	blocks 1..R        group descriptor table, reserved for the largest image
//	                   the Options limits allow (the unused tail stays free)
//	R+1 ..             file data, allocated strictly sequentially
//	after the data     block bitmaps, inode bitmaps, inode tables,
//	                   directories, long symlinks, xattr blocks, journal,
//	                   extent-tree blocks (placed by Finish)
//	then               free space: at least Options.Headroom bytes
//
// flex_bg is what makes this legal: it lets a group's bitmaps and inode table
// live anywhere in the filesystem. The allocator skips the superblock and
// descriptor backups that sparse_super puts at the start of groups 1 and of
// every group that is a power of 3, 5 or 7. Blocks freed by a later layer are
// never reused (that would break sequential streaming); they are left free
// and hole-punched, so data deleted by an upper layer is neither stored nor
// visible to the guest through the raw disk. Blocks that are entirely zero
// inside a regular file become holes, and never-written metadata (unused
// inode-table slots, the journal body) stays sparse.
//
// # Feature set
//
// Compat: has_journal, ext_attr, dir_index. Incompat: filetype, extent,
// 64bit, flex_bg. RO-compat: sparse_super, large_file, huge_file, dir_nlink,
// extra_isize, metadata_csum.
//
// This is mke2fs 1.47's default "ext4" set minus resize_inode (it needs a
// special inode whose layout only matters for offline growth; the kernel can
// grow online without it), minus orphan_file (Linux 5.15+ only), and with
// 64bit descriptors so that bitmap checksums are stored in full. Everything
// here is supported read-write by Linux >= 4.x and by e2fsprogs >= 1.43, so
// a 5.10 guest mounts it read-write. metadata_csum (crc32c) is worth its
// cost: a base disk is shared by every sandbox of an image and checksums let
// the guest kernel detect corruption instead of propagating it. Directories
// are written as linear (non-htree) directories, which every ext4 reader
// accepts; dir_index is still advertised so that the guest kernel indexes
// directories it creates or grows.
//
// The superblock is written "clean" with no errors recorded and an empty
// journal (s_start = 0), so the kernel mounts it without recovery and
// e2fsck -fn reports nothing.
package ext4
