package testenv

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// StoredBlobs checks the invariant the store rests on: every file under the containerd
// content store at root (blobs/sha256/) hashes to its name. It fails t for each that
// does not, and returns the digests there ("sha256:<hex>"); none when root has no blobs.
func StoredBlobs(t testing.TB, root string) map[string]bool {
	t.Helper()
	dir := filepath.Join(root, "blobs", "sha256")
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("reading the blob store: %v", err)
	}
	have := map[string]bool{}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f) // streamed: blobs may be large
		f.Close()
		if err != nil {
			t.Fatalf("reading %s: %v", path, err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != e.Name() {
			t.Errorf("%s holds bytes that hash to sha256:%s", path, got)
		}
		have["sha256:"+e.Name()] = true
	}
	return have
}
