package mirror

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/node-mirror/node-mirror/internal/regname"
	"github.com/node-mirror/node-mirror/internal/wire"
)

func configured(name string) bool {
	return name == "docker.io" || name == "ghcr.io" || name == "localhost:5000"
}

func TestParseRoute(t *testing.T) {
	for _, tc := range []struct {
		target                    string
		registry, repo, kind, ref string
	}{
		{"/v2/nginx/manifests/latest", "docker.io", "library/nginx", "manifests", "latest"},
		{"/v2/library/nginx/blobs/sha256:" + strings.Repeat("a", 64), "docker.io", "library/nginx", "blobs", "sha256:" + strings.Repeat("a", 64)},
		{"/v2/org/app/manifests/v1?ns=ghcr.io", "ghcr.io", "org/app", "manifests", "v1"},
		{"/v2/ghcr.io/org/app/manifests/v1", "ghcr.io", "org/app", "manifests", "v1"},
		{"/v2/localhost:5000/app/tags/list", "localhost:5000", "app", "tags", "list"},
		// ns wins over a path that happens to start with a registry name.
		{"/v2/ghcr.io/app/manifests/v1?ns=docker.io", "docker.io", "ghcr.io/app", "manifests", "v1"},
		// A lone path element named like a registry is a repository, not a prefix.
		{"/v2/ghcr.io/manifests/v1", "docker.io", "library/ghcr.io", "manifests", "v1"},
		{"/v2/a/b/c/d/referrers/sha256:" + strings.Repeat("b", 64), "docker.io", "a/b/c/d", "referrers", "sha256:" + strings.Repeat("b", 64)},
	} {
		r := httptest.NewRequest(http.MethodGet, tc.target, nil)
		rt, err := parseRoute(r, configured, "docker.io")
		if err != nil {
			t.Errorf("%s: %v", tc.target, err)
			continue
		}
		if rt.registry != tc.registry || rt.repo != tc.repo || rt.kind != tc.kind || rt.ref != tc.ref {
			t.Errorf("%s: got %+v", tc.target, rt)
		}
	}
}

// FuzzParseRoute checks that whatever a client sends, a route that parses names only a
// configured registry and a repository made of valid components: nothing a request says
// can steer the mirror to another host or outside the store's naming.
func FuzzParseRoute(f *testing.F) {
	for _, s := range []string{
		"/v2/nginx/manifests/latest", "/v2/ghcr.io/a/b/blobs/sha256:" + strings.Repeat("0", 64),
		"/v2/a/manifests/v1?ns=evil.com", "/v2/../../etc/passwd/blobs/x", "/v2/a%2Fb/tags/list",
		"/v2/a/referrers/sha512:" + strings.Repeat("1", 128), "/v2//manifests/x", "/v2/x/blobs/uploads/",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, target string) {
		if !strings.HasPrefix(target, "/") {
			target = "/" + target
		}
		r, err := http.NewRequest(http.MethodGet, "http://mirror"+target, nil)
		if err != nil {
			return
		}
		rt, err := parseRoute(r, configured, "docker.io")
		if err != nil {
			var we wire.Error
			if !errors.As(err, &we) || we.Status < 400 || we.Status > 499 {
				t.Fatalf("%q: %v, want a 4xx wire error", target, err)
			}
			return
		}
		if !configured(rt.registry) {
			t.Fatalf("%q routed to unconfigured %q", target, rt.registry)
		}
		if err := regname.CheckRepo(rt.repo); err != nil {
			t.Fatalf("%q: repository %q: %v", target, rt.repo, err)
		}
		if (rt.kind == kindBlobs || rt.kind == kindReferrers) && rt.digest.Validate() != nil {
			t.Fatalf("%q: invalid digest passed", target)
		}
	})
}
