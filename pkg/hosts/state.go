package hosts

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// StatePath is where install records what it changed, below --root. uninstall reads it to
// put every file back, so it decides what uninstall writes where, as root: it lives in a
// directory of its own that only root writes (0700), never in the service's
// StateDirectory, which the daemon's user owns. It holds copies of the original files
// (containerd's config.toml can carry registry credentials), so it is 0600 as well.
const StatePath = "/var/lib/node-mirror-install/state.json"

// legacyStatePath is where node-mirror kept install state before: in the daemon's own
// state directory, where a compromised daemon could have rewritten it. It is never read.
const legacyStatePath = "/var/lib/node-mirror/install-state.json"

const stateVersion = 1

// euid is a variable so tests can stand in for another user.
var euid = os.Geteuid

// File kinds: how a file is merged and unmerged.
const (
	kindHostsTOML       = "hosts.toml"
	kindContainerdConf  = "containerd-config"
	kindDaemonJSON      = "daemon.json"
	kindContainersDropI = "registries.conf.d"
)

// installState is the install record. Paths are host paths (without --root).
type installState struct {
	Version int `json:"version"`
	// MirrorURLs are every mirror URL install has written, newest first, so a reinstall with
	// a new URL and uninstall both find entries an older install made.
	MirrorURLs []string `json:"mirror_urls"`
	// CreatedDirs are directories install created, outermost first; uninstall removes them
	// again when empty.
	CreatedDirs []string     `json:"created_dirs,omitempty"`
	Files       []fileRecord `json:"files"`
}

// fileRecord is one file install changed.
type fileRecord struct {
	Path   string `json:"path"`
	Engine string `json:"engine"`
	Kind   string `json:"kind"`
	// Existed tells whether the file was there before the first install that changed it;
	// Original is its content then.
	Existed        bool   `json:"existed"`
	Original       []byte `json:"original,omitempty"`
	OriginalSHA256 string `json:"original_sha256"`
	// InstalledSHA256 is the content install last wrote. A file that still has it was not
	// touched since, so uninstall may put Original back byte for byte.
	InstalledSHA256 string `json:"installed_sha256"`
	// Diverged is set when someone changed the file between two installs: Original is then
	// stale and uninstall only removes our entries.
	Diverged bool `json:"diverged,omitempty"`
	// AddedServer (hosts.toml) is the server line install added, if any.
	AddedServer string `json:"added_server,omitempty"`
	// ConfigPath (containerd config) is the config_path install set.
	ConfigPath string `json:"config_path,omitempty"`
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// loadState reads the install record below root, or returns nil when there is none. The
// record is trusted only if nobody but root (or, not running as root, the invoking user)
// could have written it, and then only for files install itself writes.
func (pl *planner) loadState() (*installState, []byte, error) {
	root := pl.plan.root
	path := filepath.Join(root, StatePath)
	legacy := filepath.Join(root, legacyStatePath)
	_, lerr := os.Lstat(legacy)
	hasLegacy := lerr == nil
	b, ok, err := readTrusted(root, StatePath)
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		if hasLegacy {
			return nil, nil, fmt.Errorf("%s: install state from an earlier node-mirror, kept in the mirror's own state "+
				"directory where the daemon can write it, so it is not trusted; node-mirror now keeps it in %s. "+
				"If you are sure the file is what install wrote (its \"files\" are engine configs, \"original\" their "+
				"content before install), move it there: mkdir -p -m 0700 %s && mv %s %s && chown root: %s && chmod 0600 %s; "+
				"otherwise remove it and undo the earlier install by hand (docs/install.md lists the files). Nothing was changed",
				legacy, path, filepath.Dir(path), legacy, path, path, path)
		}
		return nil, nil, nil
	}
	if hasLegacy {
		pl.plan.note("%s is left from an earlier node-mirror and is not used; remove it (it holds copies of engine configs)", legacy)
	}
	var st installState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w (move it away to start over; uninstall cannot restore files without it)", path, err)
	}
	if st.Version != stateVersion {
		return nil, nil, fmt.Errorf("%s: state version %d, this node-mirror reads %d", path, st.Version, stateVersion)
	}
	if err := st.check(knownFiles(root)); err != nil {
		return nil, nil, fmt.Errorf("%s: %w; refusing to act on this state file, nothing was changed", path, err)
	}
	return &st, b, nil
}

// readTrusted reads the file at host path rel below root if it and every directory from
// root down to it belong to root or to us and nobody else can write them. Nothing on the
// way may be a symlink, whose target someone else could control. The file must also be
// private (no group or other bits), since it holds copies of files with passwords.
func readTrusted(root, rel string) ([]byte, bool, error) {
	path := filepath.Join(root, rel)
	if err := checkStateDirs(root, filepath.Dir(rel)); err != nil {
		return nil, false, fmt.Errorf("install state %s is not trusted: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, false, nil
	case errors.Is(err, syscall.ELOOP):
		return nil, false, fmt.Errorf("%s is a symlink; install state must be a file of its own (owned by root, mode 0600)", path)
	case err != nil:
		return nil, false, fmt.Errorf("reading %s: %w", path, err)
	}
	defer f.Close()
	// Checked on the open file, so it cannot be swapped between the check and the read.
	fi, err := f.Stat()
	if err != nil {
		return nil, false, fmt.Errorf("reading %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, false, fmt.Errorf("%s is not a regular file", path)
	}
	if err := checkOwner(path, fi); err != nil {
		return nil, false, err
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, false, fmt.Errorf("%s: mode %04o lets others read or write it (it decides what uninstall writes as root, and holds "+
			"copies of files with registry passwords); want 0600. Check that it is what install wrote, then chmod 0600 it",
			path, perm)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, false, fmt.Errorf("reading %s: %w", path, err)
	}
	return b, true, nil
}

// checkStateDirs checks root and each existing directory below it on the way to dir.
func checkStateDirs(root, dir string) error {
	fi, err := os.Stat(root) // root itself is the operator's choice, link or not
	if err != nil {
		return fmt.Errorf("--root %s: %w", root, err)
	}
	if err := checkDir(root, fi); err != nil {
		return err
	}
	p := root
	for _, part := range strings.Split(strings.Trim(dir, "/"), "/") {
		if part == "" {
			continue
		}
		p = filepath.Join(p, part)
		fi, err := os.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // install creates the rest, 0700
		}
		if err != nil {
			return fmt.Errorf("checking %s: %w", p, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return fmt.Errorf("%s is a symlink; install state must live in real directories that only root can write", p)
		}
		if err := checkDir(p, fi); err != nil {
			return err
		}
	}
	return nil
}

func checkDir(path string, fi fs.FileInfo) error {
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", path)
	}
	if err := checkOwner(path, fi); err != nil {
		return err
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("%s: mode %04o lets others replace install's state file; want 0700 (or at least not group- or world-writable)", path, perm)
	}
	return nil
}

// checkOwner accepts root, and the invoking user (tests, scratch trees with --root).
func checkOwner(path string, fi fs.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: cannot tell its owner", path)
	}
	uid := int(st.Uid)
	if uid == 0 || uid == euid() {
		return nil
	}
	who := "root"
	if me := euid(); me != 0 {
		who = fmt.Sprintf("root or uid %d (this user)", me)
	}
	return fmt.Errorf("%s: owned by uid %d, not %s: only what root could have written decides what uninstall does as root. "+
		"Check what it says, then chown it to root, or remove it", path, uid, who)
}

// files are the files install writes, which are the only ones a state file may name.
type files struct {
	// hostsDirs are the directories hosts.toml files go into, by engine.
	hostsDirs map[string][]string
}

// knownFiles are the files install could have written below root: the fixed engine
// files, and hosts.toml files under Docker's certs.d and containerd's default hosts
// directory or the config_path its config.toml names now.
func knownFiles(root string) files {
	k := files{hostsDirs: map[string][]string{
		Docker:     {dockerCertsDir},
		Containerd: {defaultContainerdHostsDir},
	}}
	b, ok, _, err := readFile(filepath.Join(root, containerdConfigFile))
	if err != nil || !ok {
		return k
	}
	if _, c, err := readContainerdConfig(containerdConfigFile, b); err == nil {
		if dir, _ := c.hostsDir(); filepath.IsAbs(dir) && !slices.Contains(k.hostsDirs[Containerd], filepath.Clean(dir)) {
			k.hostsDirs[Containerd] = append(k.hostsDirs[Containerd], filepath.Clean(dir))
		}
	}
	return k
}

// check tells whether a file record names a file install writes, as the kind and engine
// install writes it with.
func (k files) check(r fileRecord) bool {
	if !filepath.IsAbs(r.Path) || filepath.Clean(r.Path) != r.Path {
		return false
	}
	switch r.Kind {
	case kindContainerdConf:
		return r.Path == containerdConfigFile && r.Engine == Containerd
	case kindDaemonJSON:
		return r.Path == dockerDaemonJSON && r.Engine == Docker
	case kindContainersDropI:
		return r.Path == filepath.Join(containersDropInDir, containersDropInName) && r.Engine == CRIO
	case kindHostsTOML:
		reg := registryOfHostsPath(r.Path)
		return filepath.Base(r.Path) == "hosts.toml" &&
			(reg == "_default" || regname.Check(reg) == nil) &&
			slices.Contains(k.hostsDirs[r.Engine], filepath.Dir(filepath.Dir(r.Path))) &&
			(r.AddedServer == "" || r.AddedServer == serverFor(reg))
	}
	return false
}

// dirOK tells whether d is a directory install could have created: one on the way to a
// file it writes, or to its own state.
func (k files) dirOK(d string) bool {
	if !filepath.IsAbs(d) || filepath.Clean(d) != d || d == "/" {
		return false
	}
	within := func(dir string) bool { return dir == d || strings.HasPrefix(dir, d+"/") }
	for _, f := range []string{containerdConfigFile, dockerDaemonJSON, filepath.Join(containersDropInDir, containersDropInName), StatePath} {
		if within(filepath.Dir(f)) {
			return true
		}
	}
	for _, dirs := range k.hostsDirs {
		for _, h := range dirs {
			if within(h) {
				return true
			}
			if filepath.Dir(d) == h && (filepath.Base(d) == "_default" || regname.Check(filepath.Base(d)) == nil) {
				return true
			}
		}
	}
	return false
}

// check refuses a record that would have install or uninstall touch anything but the
// files install writes, or take anything but mirror URLs for ours.
func (st *installState) check(k files) error {
	seen := map[string]bool{}
	for _, r := range st.Files {
		if !k.check(r) {
			var where []string
			for _, e := range Engines {
				where = append(where, k.hostsDirs[e]...)
			}
			return fmt.Errorf("it names %q (%s, %s), which is not a file install writes (%s, %s, %s, and <registry>/hosts.toml in %s)",
				r.Path, r.Engine, r.Kind, containerdConfigFile, dockerDaemonJSON, filepath.Join(containersDropInDir, containersDropInName),
				strings.Join(where, ", "))
		}
		if seen[r.Path] {
			return fmt.Errorf("it names %q twice", r.Path)
		}
		seen[r.Path] = true
	}
	for _, d := range st.CreatedDirs {
		if !k.dirOK(d) {
			return fmt.Errorf("it names %q as a directory install created, which install never creates", d)
		}
	}
	for _, u := range st.MirrorURLs {
		if n, err := normalizeMirrorURL(u); err != nil || n != u {
			return fmt.Errorf("it names %q as a mirror URL, which is not one install writes", u)
		}
	}
	return nil
}

func (st *installState) record(path string) *fileRecord {
	for i := range st.Files {
		if st.Files[i].Path == path {
			return &st.Files[i]
		}
	}
	return nil
}

func (st *installState) encode() []byte {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		// Only strings, bools and byte slices: cannot fail.
		panic(err)
	}
	return append(b, '\n')
}
