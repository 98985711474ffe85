package mirror

import (
	"context"
	"fmt"
	"io/fs"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
)

// contentBytes sums the files under the content store: committed blobs and ingests.
func contentBytes(root string) int64 {
	var n int64
	filepath.WalkDir(root, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// TestBudgetHoldsWhileFillingPastIt pulls many images through a mirror whose budget
// holds only a few: the content store never exceeds the budget by more than the largest
// blob in flight, the most recently used image still pulls with no upstream request at
// all, and an image whose blobs and manifests were evicted pulls again (its tag's
// manifest is fetched on demand).
func TestBudgetHoldsWhileFillingPastIt(t *testing.T) {
	const (
		budget    = 1 << 20
		layerSize = 64 << 10
		images    = 24 // about 5 MiB in all
	)
	up := newUpstream(t)
	var imgs []v1.Image
	var largest int64
	for i := range images {
		img := randomImage(t, layerSize, 3)
		up.Push(fmt.Sprintf("library/img%d", i), "v1", img)
		imgs = append(imgs, img)
		ls, _ := img.Layers()
		for _, l := range ls {
			largest = max(largest, mustSize(t, l))
		}
	}
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.TagFreshness = time.Hour })
	tm.store.SetBudget(contentstore.Budget{MaxBytes: budget})

	// Sample the disk while the pulls run.
	var peak int64
	var mu sync.Mutex
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			n := contentBytes(tm.store.Path())
			mu.Lock()
			peak = max(peak, n)
			mu.Unlock()
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	for i := range images {
		tm.pull(t, fmt.Sprintf("library/img%d:v1", i))
	}
	waitNoDownloads(t, tm)
	close(stop)
	<-sampled
	peak = max(peak, contentBytes(tm.store.Path()))
	if peak > budget+largest {
		t.Fatalf("content store peaked at %d bytes; budget %d + largest blob %d", peak, budget, largest)
	}
	used, _, _ := tm.store.Usage(context.Background())
	if used > budget {
		t.Fatalf("usage %d over the budget %d after the pulls", used, budget)
	}
	if disk := contentBytes(tm.store.Path()); disk != used {
		t.Fatalf("usage kept in memory %d, on disk %d", used, disk)
	}
	first, _ := imgs[0].Layers()
	fd, _ := first[0].Digest()
	if _, err := tm.store.Size(digest.Digest(fd.String())); err == nil {
		t.Fatal("the least recently used image was not evicted; the test proves nothing")
	}

	// The most recently used image: no upstream request at all.
	before := len(up.Requests())
	tm.pull(t, fmt.Sprintf("library/img%d:v1", images-1))
	if n := len(up.Requests()) - before; n != 0 {
		t.Fatalf("pulling the most recently used image made %d upstream requests", n)
	}

	// The evicted one comes back. Its tag pointed at an evicted manifest, so the collection
	// dropped it (the index stays bounded by what the store holds); the tag and its
	// manifest are fetched again.
	md, _ := imgs[0].Digest()
	if _, err := tm.store.Size(digest.Digest(md.String())); err == nil {
		t.Fatal("the evicted image's manifest is still stored; the test proves nothing about its tag")
	}
	if _, found, _ := tm.store.Tag("docker.io", "library/img0", "v1"); found {
		t.Fatal("tag of the evicted manifest kept in the index")
	}
	before = up.CountPath(http.MethodGet, "/v2/library/img0/manifests/v1")
	tm.pull(t, "library/img0:v1")
	if up.CountPath(http.MethodGet, "/v2/library/img0/manifests/v1") == before {
		if up.CountPath(http.MethodGet, "/v2/library/img0/manifests/"+md.String()) == 0 {
			t.Fatal("evicted manifest was not fetched again")
		}
	}
	assertStoreIntact(t, tm)
}

func mustSize(t *testing.T, l v1.Layer) int64 {
	t.Helper()
	n, err := l.Size()
	if err != nil {
		t.Fatal(err)
	}
	return n
}
