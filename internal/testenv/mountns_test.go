package testenv

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The engine tests rely on this: a mount in the namespace is seen by commands run in it
// and not by the host, and the test's end leaves no process (so no mount) behind.
func TestMountNSIsPrivateAndEnds(t *testing.T) {
	src, target := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("inside"), 0o644); err != nil {
		t.Fatal(err)
	}
	var ns *MountNS
	t.Run("in", func(t *testing.T) {
		ns = NewMountNS(t, Mount{Source: src, Target: target})
		out, err := ns.run("cat", filepath.Join(target, "f"))
		if err != nil || out != "inside" {
			t.Fatalf("cat in the namespace: %q, %v", out, err)
		}
		if _, err := os.Stat(filepath.Join(target, "f")); err == nil {
			t.Error("the host sees the namespace's mount")
		}
		mounts, err := os.ReadFile("/proc/self/mounts")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(mounts), target) {
			t.Errorf("the host's mount table lists %s", target)
		}
		// A process left running, as a daemon that ignores SIGTERM would be.
		cmd := ns.Command(context.Background(), "sleep", "infinity")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go cmd.Wait()
		// The command enters the namespace after Start returns (nsenter, then exec): wait
		// for it to show up rather than race it.
		for deadline := time.Now().Add(30 * time.Second); len(ns.Pids()) != 2; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("namespace has processes %v, want the holder and sleep", ns.Pids())
			}
		}
	})
	if pids := ns.Pids(); len(pids) != 0 {
		t.Errorf("processes %v are left in the namespace after the test", pids)
	}
}
