package estargz

import (
	"time"
)

// Names, sizes and annotation keys defined by the eStargz format.
const (
	// TOCTarName is the tar entry name of the TOC in gzip eStargz blobs.
	TOCTarName = "stargz.index.json"

	// PrefetchLandmark marks the end of the prioritized files: entries
	// before it are what a workload reads at start-up.
	PrefetchLandmark = ".prefetch.landmark"
	// NoPrefetchLandmark says that the blob has no prioritized files.
	NoPrefetchLandmark = ".no.prefetch.landmark"
	// landmarkContents is the single byte stored in a landmark file.
	landmarkContents = 0x0f

	// DefaultChunkSize is the largest chunk of the default chunking rule
	// (see BuildOptions.ChunkSize).
	DefaultChunkSize = 4 << 20

	// TOCDigestAnnotation holds the sha256 of the TOC JSON on the layer
	// descriptor.
	TOCDigestAnnotation = "containerd.io/snapshot/stargz/toc.digest"
	// UncompressedSizeAnnotation holds the size of the decompressed layer.
	UncompressedSizeAnnotation = "io.containers.estargz.uncompressed-size"
	// ZstdChunkedManifestChecksumAnnotation holds the sha256 of the
	// compressed TOC of a zstd:chunked layer.
	ZstdChunkedManifestChecksumAnnotation = "io.containers.zstd-chunked.manifest-checksum"
	// ZstdChunkedManifestPositionAnnotation holds
	// "offset:compressedSize:uncompressedSize:1" of a zstd:chunked TOC.
	ZstdChunkedManifestPositionAnnotation = "io.containers.zstd-chunked.manifest-position"

	// MediaTypeLayerGzip is the OCI media type of gzip eStargz layers.
	MediaTypeLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
	// MediaTypeLayerZstd is the OCI media type of zstd:chunked layers.
	MediaTypeLayerZstd = "application/vnd.oci.image.layer.v1.tar+zstd"
	// MediaTypeDockerLayerGzip is the Docker schema 2 gzip layer type.
	MediaTypeDockerLayerGzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
)

// Entry types used in TOCEntry.Type.
const (
	TypeDir      = "dir"
	TypeReg      = "reg"
	TypeSymlink  = "symlink"
	TypeHardlink = "hardlink"
	TypeChar     = "char"
	TypeBlock    = "block"
	TypeFifo     = "fifo"
	TypeChunk    = "chunk"
)

// TOC is the JSON table of contents of an eStargz blob.
type TOC struct {
	// Version is 1.
	Version int `json:"version"`
	// Entries lists the tar entries in blob order; a large regular file
	// is a "reg" entry for its first chunk followed by "chunk" entries.
	Entries []*TOCEntry `json:"entries"`
}

// TOCEntry is one entry of the TOC. Field names and JSON keys follow the
// eStargz specification.
type TOCEntry struct {
	// Name is the entry's path inside the layer. Writers emit it cleaned
	// (no leading "/" or "./"); readers clean it.
	Name string `json:"name"`
	// Type is one of the Type* constants.
	Type string `json:"type"`
	// Size is the size of a regular file (on "reg" entries only).
	Size int64 `json:"size,omitempty"`
	// ModTime3339 is the modification time, RFC 3339 in UTC.
	ModTime3339 string `json:"modtime,omitempty"`
	// LinkName is a symlink's target or a hardlink's target entry name.
	LinkName string `json:"linkName,omitempty"`
	// Mode holds the permission bits (and setuid/setgid/sticky) as in the
	// tar header.
	Mode int64 `json:"mode,omitempty"`
	// UID and GID are the numeric owner.
	UID int `json:"uid,omitempty"`
	GID int `json:"gid,omitempty"`
	// Uname and Gname are the owner names from the tar header.
	Uname string `json:"userName,omitempty"`
	Gname string `json:"groupName,omitempty"`
	// Offset is the compressed offset of the member (gzip) or frame
	// (zstd) in which this entry's payload, or this chunk, begins.
	Offset int64 `json:"offset,omitempty"`
	// InnerOffset is where the payload begins inside the decompressed
	// member at Offset (non-zero when small files share a member).
	InnerOffset int64 `json:"innerOffset,omitempty"`
	// DevMajor and DevMinor are a device node's numbers.
	DevMajor int `json:"devMajor,omitempty"`
	DevMinor int `json:"devMinor,omitempty"`
	// Xattrs are extended attributes (PAX SCHILY.xattr records).
	Xattrs map[string][]byte `json:"xattrs,omitempty"`
	// Digest is the sha256 of a regular file's whole content.
	Digest string `json:"digest,omitempty"`
	// ChunkOffset is the offset of this chunk within the file.
	ChunkOffset int64 `json:"chunkOffset,omitempty"`
	// ChunkSize is the chunk's size; 0 on the last chunk means "to the
	// end of the file".
	ChunkSize int64 `json:"chunkSize,omitempty"`
	// ChunkDigest is the sha256 of the chunk's plain bytes.
	ChunkDigest string `json:"chunkDigest,omitempty"`
}

// formatModTime renders t the way TOC entries carry it: RFC 3339 in UTC,
// with a fraction only when t has sub-second precision (readers that parse
// plain RFC 3339 accept fractions). The zero time is omitted.
func formatModTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// parseModTime is the inverse of formatModTime; an empty string is the Unix
// epoch.
func parseModTime(s string) (time.Time, error) {
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	return time.Parse(time.RFC3339Nano, s)
}
