package hosts

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// applyUnified applies a unified diff made by unifiedDiff to a, so the test can check that
// the diff turns a into b exactly.
func applyUnified(t *testing.T, a []byte, diff string) []byte {
	t.Helper()
	src := splitLines(a)
	var out []string
	pos := 0
	lines := strings.SplitAfter(diff, "\n")
	for i := 2; i < len(lines) && lines[i] != ""; i++ {
		l := lines[i]
		if strings.HasPrefix(l, "@@") {
			var as, an, bs, bn int
			parseHunkHeader(l, &as, &an, &bs, &bn)
			start := as - 1
			if an == 0 {
				start = as
			}
			out = append(out, src[pos:start]...)
			pos = start
			continue
		}
		text := l[1:]
		if i+1 < len(lines) && strings.HasPrefix(lines[i+1], `\ No newline`) {
			text = strings.TrimSuffix(text, "\n")
			i++
		}
		switch l[0] {
		case ' ':
			if src[pos] != text {
				t.Fatalf("context mismatch at line %d: %q vs %q", pos+1, src[pos], text)
			}
			out = append(out, text)
			pos++
		case '-':
			if src[pos] != text {
				t.Fatalf("removed line mismatch at line %d: %q vs %q", pos+1, src[pos], text)
			}
			pos++
		case '+':
			out = append(out, text)
		}
	}
	out = append(out, src[pos:]...)
	return []byte(strings.Join(out, ""))
}

func parseHunkHeader(l string, as, an, bs, bn *int) {
	l = strings.TrimSuffix(strings.TrimPrefix(l, "@@ -"), " @@\n")
	a, b, _ := strings.Cut(l, " +")
	parse := func(s string, start, n *int) {
		*n = 1
		if x, y, ok := strings.Cut(s, ","); ok {
			*start, *n = atoi(x), atoi(y)
			return
		}
		*start = atoi(s)
	}
	parse(a, as, an)
	parse(b, bs, bn)
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

func TestUnifiedDiffApplies(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	words := []string{"a\n", "b\n", "c\n", "server = 1\n", "\n", "[host]\n"}
	gen := func() []byte {
		var b bytes.Buffer
		for n := r.Intn(30); n > 0; n-- {
			b.WriteString(words[r.Intn(len(words))])
		}
		if r.Intn(4) == 0 {
			b.WriteString("tail without newline")
		}
		return b.Bytes()
	}
	for i := 0; i < 2000; i++ {
		a, b := gen(), gen()
		var d bytes.Buffer
		if err := unifiedDiff(&d, "a", "b", a, b); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(a, b) {
			if d.Len() != 0 {
				t.Fatalf("diff of equal inputs: %q", d.String())
			}
			continue
		}
		if got := applyUnified(t, a, d.String()); !bytes.Equal(got, b) {
			t.Fatalf("applying the diff of\n%q\nto\n%q\ngave\n%q\ndiff:\n%s", a, b, got, d.String())
		}
	}
}

// GNU patch accepts what we print, where it is installed.
func TestUnifiedDiffPatch(t *testing.T) {
	patch, err := exec.LookPath("patch")
	if err != nil {
		t.Log("patch not installed; the in-process check in TestUnifiedDiffApplies covers the format")
		return
	}
	dir := t.TempDir()
	a := []byte(debianConfig)
	b := []byte(strings.Replace(debianConfig, "      conf_dir = \"/etc/cni/net.d\"\n", "      conf_dir = \"/etc/cni/net.d\"\n    [plugins.\"io.containerd.grpc.v1.cri\".registry]\n      config_path = \"/etc/containerd/certs.d\"\n", 1))
	f := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(f, a, 0o644); err != nil {
		t.Fatal(err)
	}
	var d bytes.Buffer
	if err := unifiedDiff(&d, f, f, a, b); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(patch, f)
	cmd.Stdin = &d
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("patch: %v\n%s", err, out)
	}
	if got, _ := os.ReadFile(f); !bytes.Equal(got, b) {
		t.Fatalf("patched file:\n%s", got)
	}
}
