package conformance

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// The distribution-spec conformance suite as published in 2023, which many registries
// still run. It is a Ginkgo test package configured by OCI_* variables, not a program, and
// its dependencies (Ginkgo 2.11, reggie) cannot live in our go.mod beside the current suite
// (a tool of go.mod). So it is compiled on its own: its module directory is copied out of
// the module cache and built there with `go test -c`, outside our module. Nothing of it is
// committed.
const (
	suite2023Module  = "github.com/opencontainers/distribution-spec/conformance"
	suite2023Version = "v0.0.0-20231101194043-f2182352d4cc"
)

// pullChecks2023 are the checks of the 2023 suite's pull workflow and how often each passes
// in one run. Its setup, when OCI_TAG_NAME, OCI_MANIFEST_DIGEST and OCI_BLOB_DIGEST are
// set, pushes nothing and only reads the tag from the environment; its teardown then
// deletes nothing. The digest checks appear twice because the suite asks for two
// manifests, and OCI_MANIFEST_DIGEST names both.
var pullChecks2023 = map[string]int{
	"Pull Setup Get tag name from environment":                                             1,
	"Pull Pull blobs HEAD request to nonexistent blob should result in 404 response":       1,
	"Pull Pull blobs HEAD request to existing blob should yield 200":                       1,
	"Pull Pull blobs GET nonexistent blob should result in 404 response":                   1,
	"Pull Pull blobs GET request to existing blob URL should yield 200":                    1,
	"Pull Pull manifests HEAD request to nonexistent manifest should return 404":           1,
	"Pull Pull manifests HEAD request to manifest path (digest) should yield 200 response": 2,
	"Pull Pull manifests HEAD request to manifest path (tag) should yield 200 response":    1,
	"Pull Pull manifests GET nonexistent manifest should return 404":                       1,
	"Pull Pull manifests GET request to manifest path (digest) should yield 200 response":  2,
	"Pull Pull manifests GET request to manifest path (tag) should yield 200 response":     1,
	"Pull Error codes 400 response body should contain OCI-conforming JSON message":        1,
}

// TestConformancePull2023 runs the 2023 suite's pull workflow against the mirror for the
// seeded content, cold, warm and warm through the path prefix, as TestConformancePull does
// for the current suite.
//
// One run of the 2023 suite pulls one tag, one manifest digest and one blob digest, and
// checks that HEAD of the tag answers the manifest's digest; so the suite runs once per
// seeded item, each manifest with the tag that names it, until every tag, manifest and
// blob has been pulled.
func TestConformancePull2023(t *testing.T) {
	suite := buildSuite2023(t)
	up := testenv.NewUpstream(t)
	data := seed(t, up, "library/conformance")
	m := testenv.StartMirror(t, testenv.MirrorOptions{
		Upstreams: []string{up.Flag("docker.io")},
		LogLevel:  "warn",
	})

	t.Run("cold", func(t *testing.T) {
		runSuite2023(t, suite, m.Addr, data.repo, data)
	})
	t.Run("warm", func(t *testing.T) {
		up.ResetRequests()
		runSuite2023(t, suite, m.Addr, data.repo, data)
		requireServedFromCache(t, up)
	})
	t.Run("warm-path-prefix", func(t *testing.T) {
		up.ResetRequests()
		runSuite2023(t, suite, m.Addr, "docker.io/"+data.repo, data)
		requireServedFromCache(t, up)
	})
}

// runSuite2023 runs the suite once per seeded item and fails the test unless every run
// passed every pull check the expected number of times and failed none.
func runSuite2023(t *testing.T, suite, addr, repo string, data seeded) {
	t.Helper()
	if len(data.tags) != len(data.manifests) {
		t.Fatalf("seed: %d tags for %d manifests; the 2023 suite needs the tag of each manifest", len(data.tags), len(data.manifests))
	}
	runs := max(len(data.manifests), len(data.blobs))
	// The suite's output, every request and response, is logged for the first run that
	// fails; the others show their failed checks only, as a failure tends to repeat.
	dumped := false
	dump := func(label, out string) {
		if !dumped {
			dumped = true
			t.Logf("2023 conformance suite, %s, against %s, repository %s:\n%s", label, addr, repo, elideBodies(out))
		}
	}
	for i := range runs {
		tag, manifest, blob := data.tags[i%len(data.tags)], data.manifests[i%len(data.manifests)], data.blobs[i%len(data.blobs)]
		env := map[string]string{
			"OCI_ROOT_URL":  "http://" + addr,
			"OCI_NAMESPACE": repo,
			// Pull workflow only: a mirror accepts no pushes or deletes.
			"OCI_TEST_PULL":               "1",
			"OCI_TEST_PUSH":               "0",
			"OCI_TEST_CONTENT_DISCOVERY":  "0",
			"OCI_TEST_CONTENT_MANAGEMENT": "0",
			// With all three set, the suite pulls this content instead of pushing its own.
			"OCI_TAG_NAME":        tag,
			"OCI_MANIFEST_DIGEST": manifest.String(),
			"OCI_BLOB_DIGEST":     blob.String(),
			// Otherwise a random name, unused by the pull workflow; fixed so runs repeat.
			"OCI_CROSSMOUNT_NAMESPACE":   repo,
			"OCI_HIDE_SKIPPED_WORKFLOWS": "1",
			// Every request and response on stdout: shown when a check fails.
			"OCI_DEBUG": "1",
		}
		label := fmt.Sprintf("run %d/%d (tag %s, manifest %s, blob %s)", i+1, runs, tag, manifest, blob)
		out, junit, runErr := execSuite2023(t, suite, env)
		failed := verdict2023(junit)
		if runErr != nil || len(failed) > 0 {
			dump(label, out)
			t.Errorf("2023 conformance, %s: exit %v, failed checks:\n%s", label, runErr, strings.Join(failed, "\n"))
			continue
		}
		// Guard against a run that passes by doing nothing: every pull check must have run
		// and passed.
		passed := passed2023(junit)
		var missing []string
		for name, want := range pullChecks2023 {
			if passed[name] != want {
				missing = append(missing, fmt.Sprintf("%q passed %d times, want %d", name, passed[name], want))
			}
		}
		if len(missing) > 0 {
			sort.Strings(missing)
			dump(label, out)
			t.Errorf("2023 conformance, %s: checks that did not pass as they should:\n%s", label, strings.Join(missing, "\n"))
			continue
		}
		t.Logf("2023 conformance, %s, %s: %d checks passed", repo, label, total(passed))
	}
}

// execSuite2023 runs the suite in a directory of its own, where it writes junit.xml and
// report.html, and returns its output and its JUnit report.
func execSuite2023(t *testing.T, suite string, env map[string]string) (string, junitSuites, error) {
	t.Helper()
	work := t.TempDir()
	env["OCI_REPORT_DIR"] = work
	cmd := exec.Command(suite, "-ginkgo.no-color")
	cmd.Dir = work
	cmd.Env = suiteEnv(env)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	runErr := cmd.Run()
	var junit junitSuites
	raw, err := os.ReadFile(filepath.Join(work, "junit.xml"))
	if err != nil {
		t.Fatalf("2023 conformance suite wrote no junit.xml (exit %v): %v\n%s", runErr, err, out.String())
	}
	if err := xml.Unmarshal(raw, &junit); err != nil {
		t.Fatalf("2023 conformance suite: junit.xml: %v\n%s", err, raw)
	}
	return out.String(), junit, runErr
}

// junitSuites is the part of Ginkgo's JUnit report the verdict is read from.
type junitSuites struct {
	Failures int `xml:"failures,attr"`
	Errors   int `xml:"errors,attr"`
	Suites   []struct {
		Name  string `xml:"name,attr"`
		Cases []struct {
			Name    string    `xml:"name,attr"`
			Status  string    `xml:"status,attr"`
			Failure *junitMsg `xml:"failure"`
			Error   *junitMsg `xml:"error"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

type junitMsg struct {
	Message string `xml:"message,attr"`
	Text    string `xml:",chardata"`
}

// verdict2023 lists the checks that neither passed nor were skipped, with their messages.
func verdict2023(j junitSuites) []string {
	var failed []string
	if j.Failures+j.Errors > 0 {
		failed = append(failed, fmt.Sprintf("junit.xml counts %d failures and %d errors", j.Failures, j.Errors))
	}
	for _, s := range j.Suites {
		for _, c := range s.Cases {
			if c.Status == "passed" || c.Status == "skipped" {
				if c.Failure == nil && c.Error == nil {
					continue
				}
			}
			line := fmt.Sprintf("%s: %s", c.Name, c.Status)
			for _, m := range []*junitMsg{c.Failure, c.Error} {
				if m != nil {
					line += "\n    " + strings.ReplaceAll(strings.TrimSpace(m.Message+"\n"+m.Text), "\n", "\n    ")
				}
			}
			failed = append(failed, line)
		}
	}
	return failed
}

// passed2023 counts the specs that passed by their text without the Ginkgo node type and
// the suite's description, e.g. "Pull Pull blobs HEAD request to existing blob should
// yield 200".
func passed2023(j junitSuites) map[string]int {
	const prefix = "[It] OCI Distribution Conformance Tests "
	passed := map[string]int{}
	for _, s := range j.Suites {
		for _, c := range s.Cases {
			if c.Status == "passed" && strings.HasPrefix(c.Name, prefix) {
				passed[strings.TrimPrefix(c.Name, prefix)]++
			}
		}
	}
	return passed
}

// elideBodies replaces the bodies in the suite's debug dump of requests and responses that
// are long or binary (the blobs it pulls) by their length, so that a failure's log shows
// every exchange and stays readable. A body starts after a "BODY :" line and ends at a
// rule of "-" or "=".
func elideBodies(out string) string {
	var b strings.Builder
	var body []string
	inBody := false
	flush := func() {
		text := strings.Join(body, "\n")
		if len(text) > 2048 || !utf8.ValidString(text) || strings.ContainsFunc(text, func(r rune) bool {
			return unicode.IsControl(r) && r != '\n' && r != '\t' && r != '\r'
		}) {
			fmt.Fprintf(&b, "***** %d bytes, not shown *****\n", len(text))
		} else if len(body) > 0 {
			b.WriteString(text + "\n")
		}
		body, inBody = nil, false
	}
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		if inBody {
			if len(trimmed) >= 20 && (strings.Trim(trimmed, "-") == "" || strings.Trim(trimmed, "=") == "") {
				flush()
			} else {
				body = append(body, line)
				continue
			}
		}
		b.WriteString(line + "\n")
		if strings.HasPrefix(trimmed, "BODY") && strings.TrimSpace(strings.TrimPrefix(trimmed, "BODY")) == ":" {
			inBody = true
		}
	}
	if inBody {
		flush()
	}
	return strings.TrimSuffix(b.String(), "\n")
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// buildSuite2023 compiles the 2023 suite: its module is downloaded through the module
// proxy (or found in the module cache), copied to a writable temp dir and built there as a
// test binary, with GOWORK off and -mod=mod so that neither our go.mod nor a go.work of
// whoever runs the tests takes part.
func buildSuite2023(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go") // go test puts its own go first on PATH
	if err != nil {
		t.Fatalf("go is not on PATH: %v", err)
	}
	tmp := t.TempDir()
	env := append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	goCmd := func(dir string, args ...string) []byte {
		t.Helper()
		cmd := exec.Command(gobin, args...)
		cmd.Dir = dir
		cmd.Env = env
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("go %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
		}
		return out
	}

	// Outside any module, so that the download touches no go.mod or go.sum of ours.
	var mod struct{ Dir, Error string }
	out := goCmd(tmp, "mod", "download", "-json", suite2023Module+"@"+suite2023Version)
	if err := json.Unmarshal(out, &mod); err != nil || mod.Error != "" || mod.Dir == "" {
		t.Fatalf("go mod download %s@%s: %v %s\n%s", suite2023Module, suite2023Version, err, mod.Error, out)
	}
	src := filepath.Join(tmp, "src")
	if err := copyTree(mod.Dir, src); err != nil {
		t.Fatalf("copy the 2023 suite out of the module cache: %v", err)
	}
	bin := filepath.Join(tmp, "conformance-2023.test")
	goCmd(src, "test", "-c", "-o", bin, ".")
	return bin
}

// copyTree copies the files under from to a new, writable tree at to (the module cache is
// read-only, and `go test -c` with -mod=mod may have to write go.sum).
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(from, path)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o644)
	})
}
