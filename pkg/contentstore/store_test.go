package contentstore

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestIngestCommitVerifies(t *testing.T) {
	ctx := context.Background()
	data := []byte("the blob's bytes")
	good := digest.FromBytes(data)
	for _, tc := range []struct {
		name    string
		write   []byte
		size    int64
		wantErr bool
	}{
		{"ok", data, int64(len(data)), false},
		{"flipped", append([]byte("T"), data[1:]...), int64(len(data)), true},
		{"short", data[:5], int64(len(data)), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t, t.TempDir())
			defer s.Close()
			in, err := s.NewIngest(ctx, good, tc.size)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			in.Write(tc.write)
			// What was written can be read back while the ingest is open.
			got := make([]byte, len(tc.write))
			if _, err := in.ReaderAt().ReadAt(got, 0); err != nil || !bytes.Equal(got, tc.write) {
				t.Fatalf("reading the ingest: %v", err)
			}
			err = in.Commit(ctx, tc.size)
			if (err != nil) != tc.wantErr {
				t.Fatalf("commit err = %v, want error %v", err, tc.wantErr)
			}
			_, serr := s.Size(good)
			if tc.wantErr == (serr == nil) {
				t.Fatalf("blob present = %v after commit err %v", serr == nil, err)
			}
			if tc.wantErr {
				if sts, _ := s.Content().ListStatuses(ctx); len(sts) != 0 {
					t.Fatalf("failed ingest left behind: %v", sts)
				}
				return
			}
			f, size, err := s.OpenBlob(good)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			b, _ := io.ReadAll(f)
			if size != int64(len(data)) || !bytes.Equal(b, data) {
				t.Fatal("committed blob differs")
			}
			// containerd's layout, so containerd tooling can read the store.
			if _, err := os.Stat(filepath.Join(s.Path(), "blobs", "sha256", good.Encoded())); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestIngestSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	data := bytes.Repeat([]byte("abc"), 1000)
	d := digest.FromBytes(data)
	s := open(t, dir)
	in, err := s.NewIngest(ctx, d, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	in.Write(data[:1000])
	in.Close()
	s.Close() // as after a crash: the ingest is left on disk, never committed

	s = open(t, dir)
	defer s.Close()
	if _, err := s.Size(d); err == nil {
		t.Fatal("partial ingest visible as a blob")
	}
	in, err = s.NewIngest(ctx, d, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if in.Offset != 1000 {
		t.Fatalf("resumed at %d, want 1000", in.Offset)
	}
	in.Write(data[1000:])
	if err := in.Commit(ctx, int64(len(data))); err != nil {
		t.Fatal(err)
	}
}

func TestDataDirIsExclusive(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	defer s.Close()
	if _, err := Open(dir); err == nil {
		t.Fatal("a second store opened the same data dir")
	}
}

func TestIndex(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	d := digest.FromString("m")
	if _, found, _ := s.Tag("docker.io", "library/a", "v1"); found {
		t.Fatal("empty index has a tag")
	}
	e := TagEntry{Digest: d, MediaType: "application/vnd.oci.image.manifest.v1+json", Size: 1}
	if err := s.SetTag("docker.io", "library/a", "v1", e); err != nil {
		t.Fatal(err)
	}
	got, found, err := s.Tag("docker.io", "library/a", "v1")
	if err != nil || !found || got != e {
		t.Fatalf("tag = %+v %v %v", got, found, err)
	}
	if _, found, _ := s.Tag("ghcr.io", "library/a", "v1"); found {
		t.Fatal("tags leak across registries")
	}
	s.DeleteTag("docker.io", "library/a", "v1")
	if _, found, _ := s.Tag("docker.io", "library/a", "v1"); found {
		t.Fatal("deleted tag still there")
	}

	s.RecordBlob(d, "mt", 10, "docker.io/library/a")
	s.RecordBlob(d, "", 10, "ghcr.io/b")
	s.Touch(d)
	if err := s.FlushAccess(); err != nil {
		t.Fatal(err)
	}
	m, found, err := s.BlobMeta(d)
	if err != nil || !found || m.MediaType != "mt" || len(m.Repos) != 2 || m.LastAccess == 0 {
		t.Fatalf("meta = %+v", m)
	}
}
