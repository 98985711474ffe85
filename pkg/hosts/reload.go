package hosts

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// procDir and signal are variables so tests can stand in for /proc and kill(2).
var (
	procDir = "/proc"
	signal  = func(pid int) error { return syscall.Kill(pid, syscall.SIGHUP) }
)

// reloadable maps engines whose daemons re-read the files we change on SIGHUP to the
// daemon's process name. containerd reads hosts.toml on every pull and needs no signal;
// its config_path needs a restart, which is the operator's call.
var reloadable = map[string]string{
	Docker: "dockerd",
	CRIO:   "crio",
}

// CheckReload tells whether Reload can work for this plan, so a caller can refuse before
// Apply rather than after: it signals this host's daemons, which read files below / only.
func (p *Plan) CheckReload() error {
	if p.root != "/" {
		return fmt.Errorf("--reload signals this host's daemons; it cannot be combined with --root %s", p.root)
	}
	return nil
}

// Reload sends SIGHUP to the running daemons whose config this plan changed (dockerd for
// daemon.json, crio for the drop-in), and reports what it did. Only meaningful with root /.
func (p *Plan) Reload() ([]string, error) {
	if err := p.CheckReload(); err != nil {
		return nil, err
	}
	want := map[string]bool{}
	for _, c := range p.changes {
		if name, ok := reloadable[c.Engine]; ok && (c.kind == kindDaemonJSON || c.kind == kindContainersDropI) {
			want[name] = true
		}
	}
	var out []string
	if len(want) == 0 {
		return nil, nil
	}
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return nil, fmt.Errorf("finding daemons to reload: %w", err)
	}
	found := map[string]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(procDir, e.Name(), "comm"))
		if err != nil {
			continue // exited meanwhile
		}
		name := strings.TrimSpace(string(comm))
		if !want[name] {
			continue
		}
		if err := signal(pid); err != nil {
			return out, fmt.Errorf("reloading %s (pid %d): %w", name, pid, err)
		}
		found[name] = true
		out = append(out, fmt.Sprintf("sent SIGHUP to %s (pid %d)", name, pid))
	}
	for _, name := range sortedKeys(want) {
		if !found[name] {
			out = append(out, fmt.Sprintf("%s is not running; it reads the new config when it starts", name))
		}
	}
	return out, nil
}
