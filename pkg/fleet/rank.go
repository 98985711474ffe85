package fleet

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"slices"
	"strconv"

	"github.com/opencontainers/go-digest"
)

// chunkKey is what a chunk is hashed by: the digest names the blob, the index the chunk.
// Every member computes it the same way, so it must never depend on local state.
func chunkKey(dgst digest.Digest, chunk int64) string {
	return string(dgst) + "#" + strconv.FormatInt(chunk, 10)
}

// score is a member's rendezvous weight for key: the first 8 bytes of
// SHA-256(key, 0, name). A cryptographic hash costs a few hundred nanoseconds per member per
// chunk of megabytes, and buys weights that no choice of digests or names can skew.
func score(key, name string) uint64 {
	h := sha256.New()
	h.Write([]byte(key))
	h.Write([]byte{0})
	h.Write([]byte(name))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// rank orders members by rendezvous (highest random weight) hashing for key: [0] owns the
// key, and removing any member leaves the relative order of the others unchanged, so a
// member leaving moves only its own keys (each to the member that was next in line for
// it) and a member joining takes only the keys it now wins. members is not modified.
func rank(members []Member, key string) []Member {
	type scored struct {
		m Member
		s uint64
	}
	sc := make([]scored, len(members))
	for i, m := range members {
		sc[i] = scored{m, score(key, m.Name)}
	}
	slices.SortFunc(sc, func(a, b scored) int {
		if c := cmp.Compare(b.s, a.s); c != 0 {
			return c
		}
		// Names are unique in a fleet; this only makes the order total.
		return cmp.Compare(a.m.Name, b.m.Name)
	})
	out := make([]Member, len(sc))
	for i := range sc {
		out[i] = sc[i].m
	}
	return out
}
