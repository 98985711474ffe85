package fleet

import (
	_ "crypto/sha512" // digest.Parse accepts only algorithms linked in (sha256 is, through auth.go)
	"fmt"
	"mime"
	"net/url"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// ChunkRequest names a byte range of a blob and where the blob comes from.
type ChunkRequest struct {
	// Registry is the registry as clients name it (host[:port]); Repo the repository in
	// it. The owner fetches from upstream with the credentials and scope they select.
	Registry, Repo string
	Digest         digest.Digest
	Size           int64 // of the whole blob
	Offset, Length int64
	// Hop is 0 when asked by the node that needs the chunk and 1 when asked by an owner
	// that lacks it; a source must not forward a hop-1 request to another member.
	Hop int
}

// DefaultMaxChunkSize bounds Length: a request costs its receiver at most this much
// upstream traffic and disk.
const DefaultMaxChunkSize = 64 << 20

const blobsPath = "/peer/v1/blobs/"

// target is the request path and query for r, as the client sends and signs it.
func (r ChunkRequest) target() string {
	q := url.Values{}
	q.Set("registry", r.Registry)
	q.Set("repo", r.Repo)
	q.Set("size", strconv.FormatInt(r.Size, 10))
	q.Set("offset", strconv.FormatInt(r.Offset, 10))
	q.Set("length", strconv.FormatInt(r.Length, 10))
	q.Set("hop", strconv.Itoa(r.Hop))
	return blobsPath + string(r.Digest) + "?" + q.Encode()
}

// ManifestRequest names a manifest by digest and where it comes from. Tags are not asked
// of peers: each node resolves them against upstream itself.
type ManifestRequest struct {
	Registry, Repo string // as in ChunkRequest
	Digest         digest.Digest
	Hop            int // as in ChunkRequest
}

// DefaultMaxManifestSize bounds a manifest served or fetched: the mirror's own limit.
const DefaultMaxManifestSize = 4 << 20

const manifestsPath = "/peer/v1/manifests/"

func (r ManifestRequest) target() string {
	q := url.Values{}
	q.Set("registry", r.Registry)
	q.Set("repo", r.Repo)
	q.Set("hop", strconv.Itoa(r.Hop))
	return manifestsPath + string(r.Digest) + "?" + q.Encode()
}

func (r ManifestRequest) validate() error {
	if err := validDigest(r.Digest); err != nil {
		return err
	}
	if err := validRegistry(r.Registry); err != nil {
		return err
	}
	if err := validRepo(r.Repo); err != nil {
		return err
	}
	if r.Hop != 0 && r.Hop != 1 {
		return fmt.Errorf("hop %d: want 0 or 1", r.Hop)
	}
	return nil
}

// maxMediaTypeLen: RFC 6838 allows 127 characters each for type and subtype.
const maxMediaTypeLen = 255

// parseMediaType accepts a media type as a Content-Type may carry it ("type/subtype",
// parameters allowed) and returns the bare type, lower-cased. It is the one rule for what
// the peer API sends and what Fetch accepts: the header is a peer's word, and what it
// says ends up in the index and in the Content-Type the mirror serves.
func parseMediaType(s string) (string, error) {
	if s == "" || len(s) > maxMediaTypeLen {
		return "", fmt.Errorf("media type length %d out of range [1, %d]", len(s), maxMediaTypeLen)
	}
	mt, _, err := mime.ParseMediaType(s)
	if err != nil {
		return "", fmt.Errorf("media type: %w", err)
	}
	if typ, sub, ok := strings.Cut(mt, "/"); !ok || typ == "" || sub == "" {
		return "", fmt.Errorf("media type %q: want type/subtype", mt)
	}
	return mt, nil
}

// validate checks every field against what a member could legitimately ask, so that the
// source never sees a request that no member would send.
func (r ChunkRequest) validate(maxChunk int64) error {
	if err := validDigest(r.Digest); err != nil {
		return err
	}
	if err := validRegistry(r.Registry); err != nil {
		return err
	}
	if err := validRepo(r.Repo); err != nil {
		return err
	}
	switch {
	case r.Size < 0 || r.Offset < 0:
		return fmt.Errorf("negative size or offset")
	case r.Length < 1 || r.Length > maxChunk:
		return fmt.Errorf("length %d out of range [1, %d]", r.Length, maxChunk)
	case r.Offset > r.Size-r.Length: // offset+length <= size without overflow
		return fmt.Errorf("range %d+%d beyond the blob's %d bytes", r.Offset, r.Length, r.Size)
	case r.Hop != 0 && r.Hop != 1:
		return fmt.Errorf("hop %d: want 0 or 1", r.Hop)
	}
	return nil
}

func validDigest(d digest.Digest) error {
	// Parse checks the algorithm's hex length and alphabet.
	p, err := digest.Parse(string(d))
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	if a := p.Algorithm(); a != digest.SHA256 && a != digest.SHA512 {
		return fmt.Errorf("digest algorithm %s not supported", a)
	}
	return nil
}

func validRepo(repo string) error { return regname.CheckRepo(repo) }

// validRegistry is the rule every registry name of the mirror's configuration meets
// (regname): a member asks only for configured registries. Whether this one is
// configured is the source's business.
func validRegistry(reg string) error {
	return regname.Check(reg)
}

// parseChunkRequest reads a request from the path (after blobsPath) and the raw query.
// Every parameter is required exactly once and nothing else is accepted.
func parseChunkRequest(dgst, rawQuery string, maxChunk int64) (ChunkRequest, error) {
	q, err := parseQuery(rawQuery, "registry", "repo", "size", "offset", "length", "hop")
	if err != nil {
		return ChunkRequest{}, err
	}
	r := ChunkRequest{Registry: q["registry"], Repo: q["repo"], Digest: digest.Digest(dgst)}
	for _, p := range []struct {
		name string
		dst  *int64
	}{{"size", &r.Size}, {"offset", &r.Offset}, {"length", &r.Length}} {
		if *p.dst, err = parseCount(q[p.name]); err != nil {
			return r, fmt.Errorf("parameter %s: %w", p.name, err)
		}
	}
	if r.Hop, err = parseHop(q["hop"]); err != nil {
		return r, err
	}
	return r, r.validate(maxChunk)
}

// parseManifestRequest reads a request from the path (after manifestsPath) and the raw
// query, as strictly as parseChunkRequest.
func parseManifestRequest(dgst, rawQuery string) (ManifestRequest, error) {
	q, err := parseQuery(rawQuery, "registry", "repo", "hop")
	if err != nil {
		return ManifestRequest{}, err
	}
	r := ManifestRequest{Registry: q["registry"], Repo: q["repo"], Digest: digest.Digest(dgst)}
	if r.Hop, err = parseHop(q["hop"]); err != nil {
		return r, err
	}
	return r, r.validate()
}

// parseQuery requires each of the names exactly once and nothing else.
func parseQuery(rawQuery string, names ...string) (map[string]string, error) {
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, fmt.Errorf("query: %w", err)
	}
	if len(q) != len(names) {
		return nil, fmt.Errorf("want exactly the parameters %s", strings.Join(names, ", "))
	}
	out := make(map[string]string, len(names))
	for _, k := range names {
		v := q[k]
		if len(v) != 1 {
			return nil, fmt.Errorf("parameter %s: want exactly one", k)
		}
		out[k] = v[0]
	}
	return out, nil
}

func parseHop(s string) (int, error) {
	switch s {
	case "0":
		return 0, nil
	case "1":
		return 1, nil
	}
	return 0, fmt.Errorf("parameter hop: want 0 or 1")
}

// parseCount accepts only plain decimal digits: no sign, no spaces, no leading zeros
// (one request, one spelling).
func parseCount(s string) (int64, error) {
	if s == "" || len(s) > 19 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("not a count")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("not a count")
		}
	}
	return strconv.ParseInt(s, 10, 64)
}
