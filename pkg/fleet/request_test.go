package fleet

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// FuzzParseChunkRequest: whatever a peer sends, a request that parses is one a member
// could have sent: it validates, and it is exactly what its own target() encodes.
func FuzzParseChunkRequest(f *testing.F) {
	blob := testBlob(1000)
	for _, r := range []ChunkRequest{chunkReq(blob, 0, 1000), chunkReq(blob, 999, 1)} {
		dgst, q, _ := strings.Cut(strings.TrimPrefix(r.target(), blobsPath), "?")
		f.Add(dgst, q)
	}
	f.Add("sha256:"+strings.Repeat("a", 64), "registry=%5B::1%5D:5000&repo=a/b&size=10&offset=9&length=1&hop=1")
	f.Add("sha512:"+strings.Repeat("0", 128), "registry=x&repo=a__b&size=1&offset=0&length=1&hop=0&hop=0")
	f.Add("sha256:"+strings.Repeat("a", 64), "registry=x&repo=a&size=9223372036854775807&offset=9223372036854775806&length=1&hop=0")
	f.Fuzz(func(t *testing.T, dgst, rawQuery string) {
		const maxChunk = 1 << 20
		r, err := parseChunkRequest(dgst, rawQuery, maxChunk)
		if err != nil {
			return
		}
		if err := r.validate(maxChunk); err != nil {
			t.Fatalf("parsed %+v fails validation: %v", r, err)
		}
		if r.Offset < 0 || r.Length < 1 || r.Length > maxChunk || r.Offset+r.Length > r.Size || r.Offset+r.Length < 0 {
			t.Fatalf("parsed an impossible range: %+v", r)
		}
		d2, q2, _ := strings.Cut(strings.TrimPrefix(r.target(), blobsPath), "?")
		r2, err := parseChunkRequest(d2, q2, maxChunk)
		if err != nil || r2 != r {
			t.Fatalf("round trip of %+v: %+v, %v", r, r2, err)
		}
	})
}

// FuzzParseManifestRequest: the same promise for manifest requests.
func FuzzParseManifestRequest(f *testing.F) {
	for _, r := range []ManifestRequest{manifestReq(digest.FromString("m")), {Registry: "[::1]:5000", Repo: "a/b", Digest: digest.SHA512.FromString("m"), Hop: 1}} {
		dgst, q, _ := strings.Cut(strings.TrimPrefix(r.target(), manifestsPath), "?")
		f.Add(dgst, q)
	}
	f.Add("sha256:"+strings.Repeat("a", 64), "registry=x&repo=a__b&hop=0&hop=0")
	f.Add("sha256:"+strings.Repeat("a", 64), "registry=x&repo=a&hop=1&size=1")
	f.Add("latest", "registry=x&repo=a&hop=0")
	f.Fuzz(func(t *testing.T, dgst, rawQuery string) {
		r, err := parseManifestRequest(dgst, rawQuery)
		if err != nil {
			return
		}
		if err := r.validate(); err != nil {
			t.Fatalf("parsed %+v fails validation: %v", r, err)
		}
		d2, q2, _ := strings.Cut(strings.TrimPrefix(r.target(), manifestsPath), "?")
		r2, err := parseManifestRequest(d2, q2)
		if err != nil || r2 != r {
			t.Fatalf("round trip of %+v: %+v, %v", r, r2, err)
		}
	})
}

// FuzzParseMediaType: whatever a peer puts in Content-Type, an accepted media type is a
// bare, bounded type/subtype that is safe in a header and survives a second parse.
func FuzzParseMediaType(f *testing.F) {
	for _, s := range []string{ociManifest, "Application/JSON; charset=utf-8", "manifest", "a/b; x=\"\\\"\"", "text/plain\r\nX: 1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		mt, err := parseMediaType(s)
		if err != nil {
			return
		}
		if len(mt) > maxMediaTypeLen || strings.Count(mt, "/") != 1 || strings.ContainsAny(mt, " ;\"\r\n\x00") || mt != strings.ToLower(mt) {
			t.Fatalf("parseMediaType(%q) = %q", s, mt)
		}
		if again, err := parseMediaType(mt); err != nil || again != mt {
			t.Fatalf("parseMediaType(%q) = %q, %v; want it unchanged", mt, again, err)
		}
	})
}
