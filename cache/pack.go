// The packed tier: small entries appended to a few large pack files instead
// of one file each. Creating a file costs an inode allocation, a directory
// entry and a rename (most of the disk tier's CPU for small chunks); an
// append to an open pack costs one pwritev(2). See the package documentation
// (Disk tier) for the layout and its guarantees.

package cache

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// Defaults of the packed tier.
const (
	// DefaultPackMaxEntry is the recommended Options.PackMaxEntry: the
	// largest entry Add appends to a pack file; larger entries get files
	// of their own.
	DefaultPackMaxEntry int64 = 1 << 20
	// DefaultPackSize is the size at which a pack file is sealed and the
	// next one started.
	DefaultPackSize int64 = 32 << 20
)

// On-disk format. All integers are little-endian.
//
//	pack file:   packMagic, then records back to back
//	record:      header (recHeader bytes), then the entry's bytes
//	header:      "LZR1", algorithm code (1 byte), 3 zero bytes,
//	             length (8), raw digest (64, zero padded),
//	             CRC-32C of the 80 bytes before (4), 4 zero bytes
//	index file:  idxMagic, covered length of the pack (8), count (4),
//	             count × {algorithm (1), length (8), record offset (8),
//	             raw digest (64)}, CRC-32C of everything before (4)
const (
	packMagic    = "LZPACK1\n"
	idxMagic     = "LZPIDX1\n"
	recMagic     = "LZR1"
	packHeader   = int64(len(packMagic))
	recHeader    = 88
	idxEntrySize = 81
	maxRawDigest = 64
	packExt      = ".pack"
	idxExt       = ".idx"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func algCode(a digest.Algorithm) byte {
	switch a {
	case digest.SHA256:
		return 1
	case digest.SHA384:
		return 2
	case digest.SHA512:
		return 3
	}
	return 0
}

func algOf(c byte) (digest.Algorithm, bool) {
	switch c {
	case 1:
		return digest.SHA256, true
	case 2:
		return digest.SHA384, true
	case 3:
		return digest.SHA512, true
	}
	return "", false
}

// putRaw writes key's algorithm code and raw digest bytes to code and raw.
func putRaw(code *byte, raw []byte, key string) error {
	d := digest.Digest(key)
	c := algCode(d.Algorithm())
	if c == 0 {
		return fmt.Errorf("cache: digest algorithm of %s cannot be packed", key)
	}
	if _, err := hex.Decode(raw[:maxRawDigest], []byte(d.Encoded())); err != nil {
		return fmt.Errorf("cache: digest %s: %w", key, err)
	}
	*code = c
	return nil
}

// keyOf rebuilds a digest key from an algorithm code and raw bytes.
func keyOf(code byte, raw []byte) (string, bool) {
	alg, ok := algOf(code)
	if !ok {
		return "", false
	}
	return string(alg) + ":" + hex.EncodeToString(raw[:alg.Size()]), true
}

// encodeRecHeader fills h for an entry of size bytes under key.
func encodeRecHeader(h *[recHeader]byte, key string, size int64) error {
	*h = [recHeader]byte{}
	copy(h[0:4], recMagic)
	if err := putRaw(&h[4], h[16:80], key); err != nil {
		return err
	}
	binary.LittleEndian.PutUint64(h[8:16], uint64(size))
	binary.LittleEndian.PutUint32(h[80:84], crc32.Checksum(h[:80], castagnoli))
	return nil
}

// decodeRecHeader parses a record header; ok is false for anything that is
// not an intact header (a torn write, garbage, zeros).
func decodeRecHeader(h []byte) (key string, size int64, ok bool) {
	if len(h) < recHeader || string(h[0:4]) != recMagic ||
		binary.LittleEndian.Uint32(h[80:84]) != crc32.Checksum(h[:80], castagnoli) {
		return "", 0, false
	}
	size = int64(binary.LittleEndian.Uint64(h[8:16]))
	if size < 0 {
		return "", 0, false
	}
	key, ok = keyOf(h[4], h[16:80])
	return key, size, ok
}

// packTier is the state of the packed tier of a Store.
type packTier struct {
	dir      string // <Dir>/packs
	maxEntry int64
	size     int64

	// mu serializes appends; it guards active, nextID, closed and all.
	mu     sync.Mutex
	active *pack
	nextID uint64
	closed bool
	all    map[uint64]*pack

	// dead is the bytes of records no longer indexed in packs not queued
	// for compaction (the sum of the packs' charged): disk space the
	// entries do not account for, so it counts against the disk limit on
	// top of them (lru.overhead). A pack queued for compaction is about to
	// give its space back: charging it until then would make evictions
	// cascade (evicting a packed entry frees nothing by itself).
	dead atomic.Int64
	// queuedBytes is the size of the packs queued for compaction and not
	// yet deleted: what disk usage may exceed the limit by. Adds help
	// compact while it is over maxQueuedPacks packs.
	queuedBytes atomic.Int64

	// Compaction runs in one goroutine at a time, over queued packs.
	cmu     sync.Mutex
	queue   []*pack
	running bool
	stopped bool // set by Close: start no more compactions
	wg      sync.WaitGroup
}

// pack is one pack file.
type pack struct {
	id      uint64
	path    string
	touched atomic.Int64 // unix seconds of the last access time written

	mu        sync.Mutex
	file      *sharedFile                    // the store's reference; nil once deleted or closed
	size      int64                          // bytes of the file in use (header, records, holes)
	live      map[*lruNode[*diskEntry]]int64 // indexed entries -> record bytes
	dead      int64                          // bytes of records not indexed, and holes
	charged   int64                          // the part of dead counted in packTier.dead
	sealed    bool                           // no more appends
	queued    bool                           // handed to compaction: its size is in queuedBytes
	deleted   bool                           // unlinked (or being): its books are closed
	noCompact bool                           // compaction failed once; do not retry
	recs      []idxRec                       // records appended by this process, for the index file
}

// packLoc is where a packed entry's record starts.
type packLoc struct {
	p   *pack
	off int64
}

// idxRec is one record as listed in an index file.
type idxRec struct {
	key  string
	size int64
	off  int64
}

func (p *pack) idxPath() string { return strings.TrimSuffix(p.path, packExt) + idxExt }

// acquire returns a referenced descriptor of the pack, or nil if it is gone.
func (p *pack) acquire() *sharedFile {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.file == nil {
		return nil
	}
	p.file.refs.Add(1)
	return p.file
}

func packName(id uint64) string { return fmt.Sprintf("%016x", id) + packExt }

// newPackLocked creates the next pack file and makes it the active one. The
// caller holds pk.mu.
func (s *Store) newPackLocked() (*pack, error) {
	pk := s.pk
	id := pk.nextID
	pk.nextID++
	path := filepath.Join(pk.dir, packName(id))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrNotExist) { // packs/ removed behind our back
		if err = os.MkdirAll(pk.dir, 0o700); err == nil {
			f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		}
	}
	if err != nil {
		return nil, err
	}
	if _, err := f.WriteAt([]byte(packMagic), 0); err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	sf := &sharedFile{f: f}
	sf.refs.Store(1)
	p := &pack{id: id, path: path, file: sf, size: packHeader, live: map[*lruNode[*diskEntry]]int64{}}
	p.touched.Store(time.Now().Unix())
	pk.active = p
	pk.all[id] = p
	return p, nil
}

// appendRecord appends data as n's record to the active pack (starting a
// new one when it is full), sets n's location and registers n as live in
// the pack. On a write error the pack is cut back to where the record
// started (so no hole is left), or, failing that, sealed.
func (s *Store) appendRecord(n *lruNode[*diskEntry], data []byte) error {
	var h [recHeader]byte
	if err := encodeRecHeader(&h, n.key, int64(len(data))); err != nil {
		return err
	}
	rec := int64(recHeader + len(data))
	pk := s.pk
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if pk.closed {
		return ErrClosed
	}
	p := pk.active
	if p != nil && p.size+rec > pk.size && p.size > packHeader {
		s.sealLocked(p)
		p = nil
	}
	if p == nil {
		var err error
		if p, err = s.newPackLocked(); err != nil {
			return err
		}
	}
	off := p.size // only appenders change it, under pk.mu
	if err := writeAtv(p.file.f, [][]byte{h[:], data}, off); err != nil {
		if terr := p.file.f.Truncate(off); terr != nil {
			p.mu.Lock()
			p.size = off + rec
			p.dead += rec
			p.charged += rec
			p.mu.Unlock()
			pk.dead.Add(rec)
			s.sealLocked(p)
		}
		return err
	}
	n.val.loc.Store(&packLoc{p: p, off: off})
	p.mu.Lock()
	p.size = off + rec
	p.live[n] = rec
	p.recs = append(p.recs, idxRec{key: n.key, size: int64(len(data)), off: off})
	p.mu.Unlock()
	return nil
}

// sealLocked ends appends to the active pack p, writes its index file and
// deletes it if nothing in it is live. The caller holds pk.mu.
func (s *Store) sealLocked(p *pack) {
	if s.pk.active == p {
		s.pk.active = nil
	}
	p.mu.Lock()
	p.sealed = true
	recs, size := p.recs, p.size
	p.recs = nil
	empty := len(p.live) == 0
	p.mu.Unlock()
	if empty {
		s.deletePackLocked(p)
		return
	}
	if err := writeIdx(p.idxPath(), recs, size); err != nil {
		log.L.WithError(err).WithField("path", p.idxPath()).Warn("cannot write a cache pack's index; the next start scans the pack")
	}
	s.maybeCompact(p)
}

// writeIdx writes the index file of a pack whose first size bytes hold
// exactly recs.
func writeIdx(path string, recs []idxRec, size int64) error {
	buf := make([]byte, 0, len(idxMagic)+12+len(recs)*idxEntrySize+4)
	buf = append(buf, idxMagic...)
	buf = binary.LittleEndian.AppendUint64(buf, uint64(size))
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(recs)))
	for _, r := range recs {
		var e [idxEntrySize]byte
		if err := putRaw(&e[0], e[17:81], r.key); err != nil {
			return err
		}
		binary.LittleEndian.PutUint64(e[1:9], uint64(r.size))
		binary.LittleEndian.PutUint64(e[9:17], uint64(r.off))
		buf = append(buf, e[:]...)
	}
	buf = binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli))
	return os.WriteFile(path, buf, 0o600)
}

// readIdx reads an index file. ok is false if it is missing, damaged or
// does not fit a pack of fileSize bytes.
func readIdx(path string, fileSize int64) (recs []idxRec, covered int64, ok bool) {
	buf, err := os.ReadFile(path)
	if err != nil || len(buf) < len(idxMagic)+12+4 || string(buf[:len(idxMagic)]) != idxMagic {
		return nil, 0, false
	}
	body := buf[:len(buf)-4]
	if binary.LittleEndian.Uint32(buf[len(buf)-4:]) != crc32.Checksum(body, castagnoli) {
		return nil, 0, false
	}
	covered = int64(binary.LittleEndian.Uint64(body[8:16]))
	count := int(binary.LittleEndian.Uint32(body[16:20]))
	ents := body[20:]
	if covered < packHeader || covered > fileSize || len(ents) != count*idxEntrySize {
		return nil, 0, false
	}
	recs = make([]idxRec, 0, count)
	for i := range count {
		e := ents[i*idxEntrySize : (i+1)*idxEntrySize]
		key, kok := keyOf(e[0], e[17:81])
		size := int64(binary.LittleEndian.Uint64(e[1:9]))
		off := int64(binary.LittleEndian.Uint64(e[9:17]))
		if !kok || size < 0 || off < packHeader || off > covered || size > covered-off-recHeader {
			return nil, 0, false
		}
		recs = append(recs, idxRec{key: key, size: size, off: off})
	}
	return recs, covered, true
}

// scanRecords reads record headers from off to the end of f (fileSize
// bytes), stopping at the first that is not intact or does not fit: a
// record torn by a crash, and anything after it, is not listed.
func scanRecords(f *os.File, off, fileSize int64) ([]idxRec, int64) {
	var recs []idxRec
	var h [recHeader]byte
	for off+recHeader <= fileSize {
		if _, err := f.ReadAt(h[:], off); err != nil {
			break
		}
		key, size, ok := decodeRecHeader(h[:])
		if !ok || size > fileSize-off-recHeader {
			break
		}
		recs = append(recs, idxRec{key: key, size: size, off: off})
		off += recHeader + size
	}
	return recs, off
}

// loadPack opens an existing pack file and lists its records: from its
// index file, plus a scan of the record headers after what the index
// covers (all of them if the index is missing or damaged, as after a
// crash). No entry's bytes are read; they are hashed on first use.
func (s *Store) loadPack(id uint64) (*pack, []scanned) {
	path := filepath.Join(s.pk.dir, packName(id))
	lg := log.L.WithField("path", path)
	writable := true
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		writable = false
		f, err = os.Open(path)
	}
	if err != nil {
		lg.WithError(err).Warn("skipping unreadable cache pack")
		return nil, nil
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		lg.WithError(err).Warn("skipping cache pack that is not a regular file")
		return nil, nil
	}
	size := fi.Size()
	mtime, err := fileTime(f)
	if err != nil {
		mtime = fi.ModTime().UnixNano()
	}
	p := &pack{id: id, path: path, size: size, sealed: true, live: map[*lruNode[*diskEntry]]int64{}}
	p.touched.Store(mtime / int64(time.Second))

	recs, covered, ok := readIdx(p.idxPath(), size)
	if !ok {
		var magic [len(packMagic)]byte
		if _, err := f.ReadAt(magic[:], 0); err != nil || string(magic[:]) != packMagic {
			f.Close()
			if size < packHeader && writable {
				// Created by a crashed process before its header was
				// written: nothing in it.
				os.Remove(path)
				return nil, nil
			}
			lg.WithError(err).Warn("skipping file in the cache's pack directory that is not a pack")
			return nil, nil
		}
		covered = packHeader
	}
	if covered < size {
		tail, end := scanRecords(f, covered, size)
		recs = append(recs, tail...)
		if writable && (len(tail) > 0 || !ok) {
			if err := writeIdx(p.idxPath(), recs, end); err != nil {
				lg.WithError(err).Warn("cannot write a cache pack's index")
			}
		}
	}
	sf := &sharedFile{f: f}
	sf.refs.Store(1)
	p.file = sf
	out := make([]scanned, 0, len(recs))
	for _, r := range recs {
		if r.size == 0 && r.key != emptyKey(r.key) {
			continue // an empty record under a non-empty digest: corrupt, never listed
		}
		out = append(out, scanned{key: r.key, size: r.size, time: mtime, loc: &packLoc{p: p, off: r.off}})
	}
	return p, out
}

// emptyKey is the digest of no bytes in key's algorithm.
func emptyKey(key string) string {
	return string(digest.Digest(key).Algorithm().FromBytes(nil))
}

// scanPacks loads every pack under <Dir>/packs, in parallel.
func (s *Store) scanPacks() ([]scanned, error) {
	ents, err := readDirUnsorted(s.pk.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache: scan %s: %w", s.pk.dir, err)
	}
	var (
		mu    sync.Mutex
		found []scanned
		g     errgroup.Group
		packs = map[uint64]bool{}
	)
	g.SetLimit(8)
	for _, e := range ents {
		name := e.Name()
		stem, ext := strings.TrimSuffix(name, filepath.Ext(name)), filepath.Ext(name)
		id, err := strconv.ParseUint(stem, 16, 64)
		if len(stem) != 16 || !isLowerHex(stem) || err != nil || (ext != packExt && ext != idxExt) {
			continue
		}
		if ext == idxExt {
			continue
		}
		packs[id] = true
		s.pk.nextID = max(s.pk.nextID, id+1)
		g.Go(func() error {
			p, out := s.loadPack(id)
			if p == nil {
				return nil
			}
			mu.Lock()
			s.pk.all[id] = p
			found = append(found, out...)
			mu.Unlock()
			return nil
		})
	}
	g.Wait()
	// Index files whose pack is gone.
	for _, e := range ents {
		name := e.Name()
		if stem, ok := strings.CutSuffix(name, idxExt); ok && len(stem) == 16 && isLowerHex(stem) {
			if id, err := strconv.ParseUint(stem, 16, 64); err == nil && !packs[id] {
				os.Remove(filepath.Join(s.pk.dir, name))
			}
		}
	}
	return found, nil
}

// settlePacks runs at the end of Open, once the scanned entries are
// indexed: it works out each pack's dead bytes, deletes packs with nothing
// live and queues mostly dead ones for compaction.
func (s *Store) settlePacks() {
	s.pk.mu.Lock()
	packs := make([]*pack, 0, len(s.pk.all))
	for _, p := range s.pk.all {
		packs = append(packs, p)
	}
	s.pk.mu.Unlock()
	for _, p := range packs {
		p.mu.Lock()
		var live int64
		for _, rec := range p.live {
			live += rec
		}
		p.dead = max(0, p.size-packHeader-live)
		empty := len(p.live) == 0
		if !empty {
			p.charged = p.dead
			s.pk.dead.Add(p.charged)
		}
		p.mu.Unlock()
		if empty {
			s.deletePack(p)
			continue
		}
		s.maybeCompact(p)
	}
}

// packRelease runs when a packed entry leaves the index (or, moved, has
// been copied to another pack by compaction): its record becomes dead. A
// sealed pack with nothing live is deleted; one that is mostly dead is
// compacted.
func (s *Store) packRelease(p *pack, n *lruNode[*diskEntry], moved bool) {
	p.mu.Lock()
	rec, ok := p.live[n]
	if !ok {
		p.mu.Unlock()
		return
	}
	delete(p.live, n)
	p.dead += rec
	if !moved && !p.queued {
		p.charged += rec
		s.pk.dead.Add(rec)
	}
	empty := p.sealed && len(p.live) == 0
	p.mu.Unlock()
	if empty {
		s.deletePack(p)
		return
	}
	s.maybeCompact(p)
}

// maybeCompact queues p for compaction if it is sealed and more than half
// of it is dead: its live records are copied to the active pack and it is
// deleted, so dead records never hold more than about as much disk as live
// ones.
func (s *Store) maybeCompact(p *pack) {
	p.mu.Lock()
	if !p.sealed || p.queued || p.noCompact || p.deleted || p.dead*2 <= p.size-packHeader {
		p.mu.Unlock()
		return
	}
	p.queued = true
	s.pk.dead.Add(-p.charged)
	p.charged = 0
	s.pk.queuedBytes.Add(p.size)
	p.mu.Unlock()

	pk := s.pk
	pk.cmu.Lock()
	defer pk.cmu.Unlock()
	pk.queue = append(pk.queue, p)
	if pk.running || pk.stopped {
		return
	}
	pk.running = true
	pk.wg.Add(1)
	go s.compactLoop()
}

func (s *Store) compactLoop() {
	pk := s.pk
	defer pk.wg.Done()
	for {
		pk.cmu.Lock()
		if len(pk.queue) == 0 || s.closed.Load() {
			pk.queue = nil
			pk.running = false
			pk.cmu.Unlock()
			return
		}
		p := pk.queue[0]
		pk.queue = pk.queue[1:]
		pk.cmu.Unlock()
		s.compact(p)
	}
}

// maxQueuedPacks is how many packs' worth of bytes may wait for
// compaction before Adds help compact (backpressure on the disk overshoot).
const maxQueuedPacks = 2

// helpCompact compacts queued packs in the calling goroutine while more
// than maxQueuedPacks packs' bytes wait for compaction.
func (s *Store) helpCompact() {
	pk := s.pk
	for pk.queuedBytes.Load() > maxQueuedPacks*pk.size && !s.closed.Load() {
		pk.cmu.Lock()
		if len(pk.queue) == 0 || pk.stopped {
			pk.cmu.Unlock()
			return
		}
		p := pk.queue[0]
		pk.queue = pk.queue[1:]
		pk.wg.Add(1) // Close waits for us too
		pk.cmu.Unlock()
		s.compact(p)
		pk.wg.Done()
	}
}

// compact copies p's live records to the active pack, then deletes p. The
// copies keep their entries' verification state: an entry not yet hashed
// in this process is hashed on its first read from the new place. If a
// copy fails to write (a full disk), compaction of p stops and p stays, its
// dead bytes charged again.
func (s *Store) compact(p *pack) {
	sf := p.acquire()
	if sf == nil {
		return
	}
	defer sf.release()
	p.mu.Lock()
	nodes := make([]*lruNode[*diskEntry], 0, len(p.live))
	for n := range p.live {
		nodes = append(nodes, n)
	}
	p.mu.Unlock()

	// When the tier is nearly full, entries among its least recently
	// used quarter are evicted with the pack rather than copied: they
	// would be the next to go anyway. When entries are evicted in the
	// order they were added (a stream nobody reads twice), a pack is thus
	// dropped whole, without copying; only entries used since they were
	// written are moved.
	clock, count := s.disk.clock.Load(), uint64(s.disk.count.Load())
	lim := s.disk.limit
	full := lim >= 0 && s.disk.charged()+s.pk.queuedBytes.Load() > lim-lim/8
	var buf []byte
	var short, cold []*lruNode[*diskEntry]
	for _, n := range nodes {
		if s.closed.Load() {
			return
		}
		e := n.val
		e.lmu.Lock()
		loc := e.loc.Load()
		if e.removed.Load() || loc == nil || loc.p != p {
			e.lmu.Unlock()
			continue
		}
		if full && clock-n.stamp.Load() > count*3/4 {
			e.lmu.Unlock()
			cold = append(cold, n)
			continue
		}
		if int64(cap(buf)) < e.size {
			buf = make([]byte, e.size)
		}
		b := buf[:e.size]
		if nr, err := sf.f.ReadAt(b, loc.off+recHeader); int64(nr) < e.size {
			e.lmu.Unlock()
			log.L.WithError(err).WithField("digest", n.key).Debug("cache pack record unreadable during compaction")
			short = append(short, n)
			continue
		}
		err := s.appendRecord(n, b) // sets the new location, registers n there
		if err != nil {
			e.lmu.Unlock()
			if !errors.Is(err, ErrClosed) {
				log.L.WithError(err).WithField("path", p.path).Warn("cache pack compaction stopped")
			}
			p.mu.Lock()
			if p.queued && !p.deleted {
				p.queued, p.noCompact = false, true
				s.pk.queuedBytes.Add(-p.size)
				s.pk.dead.Add(p.dead - p.charged)
				p.charged = p.dead
			}
			p.mu.Unlock()
			return
		}
		s.packRelease(p, n, true)
		e.lmu.Unlock()
	}
	for _, n := range cold {
		if s.disk.remove(n) {
			s.disk.evictions.Add(1)
		}
	}
	// Records that could not be read are discarded like any unreadable
	// entry (and fetched again by whoever needs them).
	for _, n := range short {
		if loc := n.val.loc.Load(); loc != nil && loc.p == p {
			s.discard(n, "unreadable while compacting its pack")
		}
	}
}

// deletePack unlinks p and its index file. Readers holding its descriptor
// finish their reads.
func (s *Store) deletePack(p *pack) {
	s.pk.mu.Lock()
	defer s.pk.mu.Unlock()
	s.deletePackLocked(p)
}

// deletePackLocked is deletePack for a caller holding pk.mu.
func (s *Store) deletePackLocked(p *pack) {
	p.mu.Lock()
	sf := p.file
	p.file = nil
	if !p.deleted {
		p.deleted = true
		s.pk.dead.Add(-p.charged)
		p.charged = 0
		if p.queued {
			s.pk.queuedBytes.Add(-p.size)
		}
	}
	p.mu.Unlock()
	if sf == nil {
		return
	}
	delete(s.pk.all, p.id)
	if s.pk.active == p {
		s.pk.active = nil
	}
	for _, path := range []string{p.path, p.idxPath()} {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			log.L.WithError(err).WithField("path", path).Warn("cannot remove cache pack")
		}
	}
	sf.release()
}

// closePacks seals the active pack (writing its index, so the next Open
// needs no scan), waits for compaction to stop and releases the packs'
// descriptors.
func (s *Store) closePacks() {
	pk := s.pk
	pk.mu.Lock()
	pk.closed = true
	if pk.active != nil {
		s.sealLocked(pk.active)
	}
	pk.mu.Unlock()
	pk.cmu.Lock()
	pk.stopped = true
	pk.cmu.Unlock()
	pk.wg.Wait()
	pk.mu.Lock()
	packs := make([]*pack, 0, len(pk.all))
	for _, p := range pk.all {
		packs = append(packs, p)
	}
	pk.mu.Unlock()
	for _, p := range packs {
		p.mu.Lock()
		sf := p.file
		p.file = nil
		p.mu.Unlock()
		if sf != nil {
			sf.release()
		}
	}
}

// promote turns the packed entry n into an entry file of its own, for
// OpenFile (FUSE passthrough needs a file holding exactly the entry). n
// has been verified. It returns the new node; the pack record is dead.
func (s *Store) promote(n *lruNode[*diskEntry]) (*lruNode[*diskEntry], error) {
	buf := make([]byte, n.val.size)
	if _, err := s.readDisk(n, buf, 0); err != nil && err != io.EOF {
		return nil, err
	}
	// Not s.adding's key for the entry: an Add sharing this call would
	// get a promotion's answer, and this one an Add's (a packed node).
	v, err, _ := s.adding.Do("promote "+n.key, func() (any, error) {
		cur, ok := s.disk.peek(n.key)
		if !ok {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, n.key)
		}
		if cur.val.loc.Load() == nil {
			return cur, nil // promoted meanwhile
		}
		return s.writeFile(digest.Digest(n.key), buf, cur)
	})
	if err != nil {
		return nil, err
	}
	nn := v.(*lruNode[*diskEntry])
	if s.mem != nil {
		if me, ok := s.mem.peek(n.key); ok {
			me.val.disk.Store(nn)
		}
	}
	s.disk.shrink()
	return nn, nil
}
