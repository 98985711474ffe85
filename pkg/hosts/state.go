package hosts

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path/filepath"
)

// StatePath is where install records what it changed, below --root. uninstall reads it to
// put every file back; it holds copies of the original files, so it is written 0600
// (containerd's config.toml can carry registry credentials).
const StatePath = "/var/lib/node-mirror/install-state.json"

const stateVersion = 1

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

func loadState(root string) (*installState, []byte, error) {
	path := filepath.Join(root, StatePath)
	b, ok, _, err := readFile(path)
	if err != nil || !ok {
		return nil, nil, err
	}
	var st installState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w (move it away to start over; uninstall cannot restore files without it)", path, err)
	}
	if st.Version != stateVersion {
		return nil, nil, fmt.Errorf("%s: state version %d, this node-mirror reads %d", path, st.Version, stateVersion)
	}
	return &st, b, nil
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
