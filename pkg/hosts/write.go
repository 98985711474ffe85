package hosts

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// fileInfo is what we keep of an existing file so a rewrite looks like an in-place edit.
type fileInfo struct {
	mode     fs.FileMode
	uid, gid int
	known    bool
}

// readFile returns the file's bytes, whether it exists, and its mode and owner.
// Symlinks are refused: renaming over one would replace the link with a copy and
// silently detach the file from whatever manages the target.
func readFile(path string) ([]byte, bool, fileInfo, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, fileInfo{}, nil
	}
	if err != nil {
		return nil, false, fileInfo{}, fmt.Errorf("reading %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		target, _ := os.Readlink(path)
		return nil, false, fileInfo{}, fmt.Errorf("%s is a symlink to %s: edit the target or replace the link with a file, then run again", path, target)
	}
	if !fi.Mode().IsRegular() {
		return nil, false, fileInfo{}, fmt.Errorf("%s is not a regular file", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false, fileInfo{}, fmt.Errorf("reading %s: %w", path, err)
	}
	info := fileInfo{mode: fi.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky), known: true}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		info.uid, info.gid = int(st.Uid), int(st.Gid)
	}
	return b, true, info, nil
}

// writeAtomic replaces path with data so that readers see the old file or the new one,
// never a mix, and a crash leaves one of the two: a temporary file in the same directory
// is written, synced, given the old file's mode and owner, renamed over the target, and
// the directory is synced so the rename itself is durable.
func writeAtomic(path string, data []byte, info fileInfo, newMode fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".node-mirror-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	mode := newMode
	if info.known {
		mode = info.mode
	}
	// Chmod after create: CreateTemp uses 0600 and the umask must not narrow the mode.
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if info.known {
		if err = f.Chown(info.uid, info.gid); err != nil && !(errors.Is(err, fs.ErrPermission) && sameOwner(f, info)) {
			return fmt.Errorf("writing %s: keeping owner %d:%d: %w", path, info.uid, info.gid, err)
		}
		err = nil
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return syncDir(dir)
}

func sameOwner(f *os.File, info fileInfo) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == info.uid && int(st.Gid) == info.gid
}

// removeFile deletes path durably; a file already gone is not an error.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}

// missingDirs lists dir and those of its parents below root that do not exist yet,
// outermost first, as host paths.
func missingDirs(root, dir string) ([]string, error) {
	var out []string
	for d := dir; d != "/" && d != "." && d != ""; d = filepath.Dir(d) {
		_, err := os.Lstat(filepath.Join(root, d))
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("checking %s: %w", filepath.Join(root, d), err)
		}
		out = append([]string{d}, out...)
	}
	return out, nil
}
