// Package conformance runs the OCI distribution-spec conformance suite, pull workflow,
// against the node-mirror binary, in two versions: the current one (this file) and the one
// published in 2023, which many registries still run (conformance2023_test.go). Run with
// `make conformance`.
//
// The current suite (module github.com/opencontainers/distribution-spec/conformance, a
// go.mod tool) is a program: it is built from the module cache into a temp dir and run as a
// process with its configuration in OCI_* variables. A mirror is read-only, so the suite
// runs in its read-only mode: pushes and deletes off, and the content to pull named up front
// (OCI_RO_DATA_*, the current names of the OCI_TAG_NAME, OCI_MANIFEST_DIGEST and
// OCI_BLOB_DIGEST the issue names; the suite maps the old names onto these). That content
// is pre-seeded in an upstream registry, and the mirror serves it as docker.io.
//
// The suite cannot send ?ns=, so the mirror is reached the two other ways clients have:
// the default registry (no ns, no prefix: /v2/library/conformance/..., as Docker's
// registry-mirrors does) and the path prefix (/v2/docker.io/library/conformance/..., as
// containers/image does). The runs are cold (empty cache), warm (everything cached, and
// the upstream must not be asked for a blob or a manifest by digest again), and warm
// through the path prefix. Each run is the suite's read-only branches, one process each;
// the verdict is read from the report the suite prints (see branches and runBranch for the
// two bugs of the pinned suite in read-only mode that this works around).
package conformance

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

const suitePkg = "github.com/opencontainers/distribution-spec/conformance"

// seeded is the content pre-seeded in the upstream, as the suite's read-only inputs.
type seeded struct {
	repo      string
	tags      []string  // tags[i] names manifests[i]
	manifests []v1.Hash // every one tagged: the 2023 suite pulls each by its tag and its digest
	blobs     []v1.Hash
	referrers []v1.Hash // subjects
}

func TestConformancePull(t *testing.T) {
	suite := buildSuite(t)
	up := testenv.NewUpstream(t)
	data := seed(t, up, "library/conformance")
	m := testenv.StartMirror(t, testenv.MirrorOptions{
		Upstreams: []string{up.Flag("docker.io")},
		LogLevel:  "warn", // the suite makes hundreds of requests; failures still log
	})

	t.Run("cold", func(t *testing.T) {
		runSuite(t, suite, m.Addr, data.repo, data)
	})
	t.Run("warm", func(t *testing.T) {
		up.ResetRequests()
		runSuite(t, suite, m.Addr, data.repo, data)
		requireServedFromCache(t, up)
	})
	t.Run("warm-path-prefix", func(t *testing.T) {
		up.ResetRequests()
		runSuite(t, suite, m.Addr, "docker.io/"+data.repo, data)
		requireServedFromCache(t, up)
	})
}

// requireServedFromCache fails if the upstream was asked for a blob or a manifest by
// digest: a warm run must get them from the mirror's store. Tags may be revalidated, and
// tag lists and referrers are passed through.
func requireServedFromCache(t *testing.T, up *testenv.Upstream) {
	t.Helper()
	for _, r := range up.Requests() {
		if strings.Contains(r.Path, "/blobs/") || strings.Contains(r.Path, "/manifests/sha256:") {
			if r.Method == http.MethodGet && r.Status == http.StatusOK {
				t.Errorf("warm run downloaded %s from upstream; it is cached\nupstream requests:\n%s", r.Path, up.RequestLog())
				return
			}
		}
	}
}

// seed pushes to repo on up: a Docker schema 2 image (tag image), an OCI index of two
// platforms (tag index; its images tagged index-linux-amd64 and index-linux-arm64), and an
// OCI artifact whose subject is the image (tag sbom), so the referrers API has something
// to list.
func seed(t *testing.T, up *testenv.Upstream, repo string) seeded {
	t.Helper()
	s := seeded{repo: repo}
	img := up.PushRandomImage(repo, "image", 3, 64<<10)
	s.tags = append(s.tags, "image")
	s.manifests = append(s.manifests, img.Digest)
	s.blobs = append(s.blobs, img.Blobs()...)

	idx := up.PushRandomIndex(repo, "index", 2, 32<<10)
	s.tags = append(s.tags, "index")
	s.manifests = append(s.manifests, idx.Digest)
	for _, p := range []string{"linux/amd64", "linux/arm64"} {
		plat := idx.Platforms[p]
		raw, err := plat.Image.RawManifest()
		if err != nil {
			t.Fatal(err)
		}
		tag := "index-" + strings.ReplaceAll(p, "/", "-")
		up.PushManifest(repo, tag, plat.MediaType, raw)
		s.tags = append(s.tags, tag)
		s.manifests = append(s.manifests, plat.Digest)
		s.blobs = append(s.blobs, plat.Blobs()...)
	}

	emptyConfig := up.PushBlob(repo, []byte("{}"))
	payload := []byte("an SBOM, for the referrers API\n")
	layer := up.PushBlob(repo, payload)
	artifact := map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIManifestSchema1,
		"artifactType":  "application/vnd.node-mirror.test.sbom",
		"config":        map[string]any{"mediaType": "application/vnd.oci.empty.v1+json", "digest": emptyConfig.String(), "size": 2},
		"layers":        []any{map[string]any{"mediaType": "text/plain", "digest": layer.String(), "size": len(payload)}},
		"subject":       map[string]any{"mediaType": img.MediaType, "digest": img.Digest.String(), "size": img.Size},
	}
	body, err := json.Marshal(artifact)
	if err != nil {
		t.Fatal(err)
	}
	d, _, err := v1.SHA256(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	up.PushManifest(repo, d.String(), types.OCIManifestSchema1, body)
	up.PushManifest(repo, "sbom", types.OCIManifestSchema1, body)
	s.tags = append(s.tags, "sbom")
	s.manifests = append(s.manifests, d)
	s.blobs = append(s.blobs, emptyConfig, layer)
	s.referrers = append(s.referrers, img.Digest)
	return s
}

// buildSuite compiles the conformance suite from the module cache.
func buildSuite(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go") // go test puts its own go first on PATH
	if err != nil {
		t.Fatalf("go is not on PATH: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "conformance")
	out, err := exec.Command(gobin, "build", "-o", bin, suitePkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go build %s: %v\n%s", suitePkg, err, out)
	}
	return bin
}

// branches are the parts of the suite's test tree that apply to a read-only registry; the
// suite runs once per branch (OCI_FILTER_TEST). The blob push branches are left out: with
// pushes off, the pinned suite skips them and then panics writing results.yaml
// (ReportResultsYAML meets a data status without data, "blobs-sha256").
var branches = []string{
	"ping",                  // GET /v2/
	"empty",                 // tag list, and referrers of an unknown subject
	"read-only",             // the seeded content: tags, manifests, blobs, referrers (GET and HEAD)
	"missing-manifest",      // 404 for an unknown tag and an unknown digest
	"invalid-digest-format", // 400/404 for sha256:baddigeststring
}

// runSuite runs the suite's branches against the registry at addr (plain HTTP) for repo
// and fails the test unless each reports zero failures and errors, and the pull checks ran
// and passed for every seeded tag, manifest and blob.
func runSuite(t *testing.T, suite, addr, repo string, data seeded) {
	t.Helper()
	passed := map[string]int{}
	for _, branch := range branches {
		runBranch(t, suite, addr, repo, data, "OCI Conformance Test/"+branch, passed)
	}
	// Guard against runs that pass by doing nothing: each check must have run for the
	// seeded content.
	for name, want := range map[string]int{
		"manifest-by-tag":         len(data.tags),
		"manifest-head-by-tag":    len(data.tags),
		"manifest-by-digest":      len(data.manifests),
		"manifest-head-by-digest": len(data.manifests),
		"blob-get":                len(data.blobs),
		"blob-head":               len(data.blobs),
		"referrers":               len(data.referrers) + 1, // + the empty one
		"tag-list":                1,
		"tag list":                1,
		"ping":                    1,
		"by-tag":                  1, // missing-manifest
		"by-digest":               1,
		"manifest-get":            1, // invalid-digest-format
	} {
		if passed[name] < want {
			t.Errorf("conformance: %d %q checks passed, want at least %d; passed: %v", passed[name], name, want, passed)
		}
	}
}

// runBranch runs one branch and adds the names of the checks that passed to passed. The
// suite's report goes to the test log; when a check fails, the branch runs again with
// debug logging, which shows the requests and responses of every failed check.
//
// The verdict is read from the report the suite prints, not from its exit status or its
// result files: in read-only mode the pinned suite cannot write results.yaml (a status it
// never set, "Unknown", does not marshal), and it then returns before junit.xml and before
// the exit status that says a check failed.
func runBranch(t *testing.T, suite, addr, repo string, data seeded, filter string, passed map[string]int) {
	t.Helper()
	env := map[string]string{
		"OCI_REGISTRY":    addr,
		"OCI_TLS":         "disabled",
		"OCI_REPO1":       repo,
		"OCI_REPO2":       repo,
		"OCI_VERSION":     "1.1",
		"OCI_FILTER_TEST": filter,
		// Pull workflow only: a mirror accepts no pushes or deletes.
		"OCI_API_PULL":             "true",
		"OCI_API_PUSH":             "false",
		"OCI_API_BLOBS_DELETE":     "false",
		"OCI_API_MANIFESTS_DELETE": "false",
		"OCI_API_TAGS_DELETE":      "false",
		// The suite's OCI_API_*_DIGEST_HEADER checks cannot be used here: in read-only
		// mode it never keeps the response they look at, and reports the header missing.
		"OCI_RO_DATA_TAGS":      strings.Join(data.tags, " "),
		"OCI_RO_DATA_MANIFESTS": join(data.manifests),
		"OCI_RO_DATA_BLOBS":     join(data.blobs),
		"OCI_RO_DATA_REFERRERS": join(data.referrers),
	}
	out, runErr := execSuite(t, suite, env)
	r := parseReport(out)
	switch {
	case r.result == "":
		t.Logf("conformance suite, %s, against %s, repository %s:\n%s", filter, addr, repo, out)
		t.Errorf("conformance, %s: the suite printed no result (%v); its output is above", filter, runErr)
		return
	case r.result == "Pass" && r.counts["FAIL"] == 0 && r.counts["Error"] == 0:
		t.Logf("conformance suite, %s, against %s, repository %s:\n%s", filter, addr, repo, r.summary)
	default:
		t.Logf("conformance suite, %s, against %s, repository %s:\n%s", filter, addr, repo, out)
		t.Errorf("conformance, %s: result %s, %d failures, %d errors:\n%s",
			filter, r.result, r.counts["FAIL"], r.counts["Error"], strings.Join(r.failed, "\n"))
		env["OCI_LOG"] = "debug"
		debug, _ := execSuite(t, suite, env)
		var failed []string
		for _, l := range strings.Split(debug, "\n") {
			if strings.Contains(l, `msg="failed test`) {
				failed = append(failed, strings.ReplaceAll(l, `\n`, "\n"))
			}
		}
		t.Logf("conformance suite, %s, again with OCI_LOG=debug, the failed checks' requests and responses:\n%s",
			filter, strings.Join(failed, "\n"))
	}
	for name, n := range r.passed {
		passed[name] += n
	}
}

// execSuite runs the suite binary in a directory of its own (no oci-conformance.yaml
// there, so only env configures it) and returns its output.
func execSuite(t *testing.T, suite string, env map[string]string) (string, error) {
	t.Helper()
	work := t.TempDir()
	env["OCI_RESULTS_DIR"] = filepath.Join(work, "results")
	cmd := exec.Command(suite)
	cmd.Dir = work
	cmd.Env = suiteEnv(env)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

// report is what the suite prints: a tree of "<name>: <status>" lines, the errors of
// failed leaves as " - <error>" lines under them, then "OCI Conformance Result: <status>"
// and a count per status.
type report struct {
	result  string
	counts  map[string]int
	passed  map[string]int // by the last element of the check's name
	failed  []string       // the lines of failed checks and their errors
	summary string         // the tree and the counts, without the configuration
}

var (
	reportLine = regexp.MustCompile(`^\s*(OCI Conformance Test(?:/[^:]*)?): (Pass|FAIL|Error|Skip|Disabled|Unknown)$`)
	resultLine = regexp.MustCompile(`^OCI Conformance Result: (\w+)$`)
	countLine  = regexp.MustCompile(`^\s+(Disabled|Skip|Pass|FAIL|Error)\.*:\s+(\d+)$`)
)

func parseReport(out string) report {
	r := report{counts: map[string]int{}, passed: map[string]int{}}
	var summary strings.Builder
	inResult, lastFailed := false, false
	for _, line := range strings.Split(out, "\n") {
		if m := resultLine.FindStringSubmatch(line); m != nil {
			r.result, inResult = m[1], true
			summary.WriteString(line + "\n")
			continue
		}
		if inResult {
			if m := countLine.FindStringSubmatch(line); m != nil {
				n, _ := strconv.Atoi(m[2])
				r.counts[m[1]] = n
				summary.WriteString(line + "\n")
			}
			continue
		}
		if m := reportLine.FindStringSubmatch(line); m != nil {
			summary.WriteString(line + "\n")
			lastFailed = m[2] == "FAIL" || m[2] == "Error"
			if lastFailed {
				r.failed = append(r.failed, strings.TrimSpace(line))
			}
			if m[2] == "Pass" {
				r.passed[leaf(m[1])]++
			}
			continue
		}
		if lastFailed && strings.HasPrefix(strings.TrimSpace(line), "- ") {
			r.failed = append(r.failed, "    "+strings.TrimSpace(line))
		}
	}
	r.summary = summary.String()
	return r
}

// suiteEnv is the environment without the OCI_* variables of whoever runs the tests
// (except logging), plus env.
func suiteEnv(env map[string]string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "OCI_") && !strings.HasPrefix(kv, "OCI_LOG=") && !strings.HasPrefix(kv, "OCI_DEBUG=") {
			continue
		}
		out = append(out, kv)
	}
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}

// leaf is the last element of a test name, e.g. "blob-get" of
// "OCI Conformance Test/read-only/pull/blob-get".
func leaf(name string) string {
	return name[strings.LastIndex(name, "/")+1:]
}

func join(ds []v1.Hash) string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = d.String()
	}
	return strings.Join(s, " ")
}
