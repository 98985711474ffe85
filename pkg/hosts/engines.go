package hosts

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/node-mirror/node-mirror/internal/regname"
	"github.com/node-mirror/node-mirror/pkg/config"
)

// engines picks the engines to configure: those named, or those found below the root.
func (pl *planner) engines(named []string) ([]string, error) {
	if len(named) > 0 {
		var out []string
		for _, n := range named {
			n = strings.TrimSpace(n)
			if !slices.Contains(Engines, n) {
				return nil, fmt.Errorf("unknown engine %q (want %s)", n, strings.Join(Engines, ", "))
			}
			if !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
		// Keep our order so output is stable whatever the flag's order.
		slices.SortFunc(out, func(a, b string) int { return slices.Index(Engines, a) - slices.Index(Engines, b) })
		return out, nil
	}
	var out []string
	for _, e := range Engines {
		if present(pl.plan.root, e) {
			out = append(out, e)
		} else {
			pl.plan.note("%s: not found on this host, skipped (name it in --engines to configure it anyway)", e)
		}
	}
	return out, nil
}

// Signs that an engine is installed, below the root.
var (
	engineDirs = map[string][]string{
		Containerd: {"/etc/containerd"},
		Docker:     {"/etc/docker"},
		CRIO:       {"/etc/containers", "/etc/crio"},
	}
	engineBins = map[string][]string{
		Containerd: {"containerd"},
		Docker:     {"dockerd"},
		CRIO:       {"crio", "podman", "skopeo", "buildah"},
	}
	binDirs = []string{"/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin", "/bin", "/sbin"}
)

func present(root, engine string) bool {
	for _, d := range engineDirs[engine] {
		if fi, err := os.Stat(filepath.Join(root, d)); err == nil && fi.IsDir() {
			return true
		}
	}
	for _, b := range engineBins[engine] {
		for _, d := range binDirs {
			if _, err := os.Stat(filepath.Join(root, d, b)); err == nil {
				return true
			}
		}
	}
	return false
}

const containerdConfigFile = "/etc/containerd/config.toml"

// containerd plans config_path (when needed) and a hosts.toml per registry.
func (pl *planner) containerd() []string {
	var paths []string
	dir := defaultContainerdHostsDir
	c, err := pl.read(containerdConfigFile, Containerd, kindContainerdConf)
	if err != nil {
		pl.fail(err)
		return nil
	}
	disk := pl.plan.onDisk(containerdConfigFile)
	switch {
	case !c.exists:
		// Without a config.toml, neither 1.x's CRI nor 2.x's reads any hosts.toml (see
		// hostsDir), so one that sets config_path and nothing else is written.
		c.new = []byte(newContainerdConfig(dir))
		paths = append(paths, containerdConfigFile)
		pl.plan.note("containerd: no %s; writing one that sets only config_path = %q, for Kubernetes (CRI) pulls; "+
			"restart containerd to read it (systemctl restart containerd; running containers keep running)", disk, dir)
	default:
		d, cfg, err := readContainerdConfig(disk, c.old)
		if err != nil {
			pl.fail(err)
			return nil
		}
		var needsSet bool
		dir, needsSet = cfg.hostsDir()
		if !filepath.IsAbs(dir) {
			pl.fail(fmt.Errorf("%s: config_path %q is not an absolute path, so install cannot tell where containerd reads hosts.toml files", disk, dir))
			return nil
		}
		dir = filepath.Clean(dir)
		if needsSet {
			b, err := setConfigPath(disk, d, cfg, dir)
			if err != nil {
				pl.fail(err)
				return nil
			}
			c.new = b
			paths = append(paths, containerdConfigFile)
			if cfg.isList() {
				pl.noteListDropped(cfg.configPath, dir)
			}
			pl.plan.note("containerd: set config_path = %q in %s; restart containerd to read it (systemctl restart containerd; running containers keep running)", dir, disk)
		} else if r := pl.state.record(containerdConfigFile); r != nil {
			// An earlier install set config_path; it is still ours to undo.
			paths = append(paths, containerdConfigFile)
		}
	}
	paths = append(paths, pl.hostsFiles(Containerd, dir)...)
	return paths
}

// newContainerdConfig is the config.toml install writes where there was none. Version 2
// is the one both 1.x (1.3 and later) and 2.x read; 2.x migrates it on load.
func newContainerdConfig(dir string) string {
	return "# Written by `node-mirror install`, which found no config.toml: containerd's CRI reads\n" +
		"# hosts.toml files only from config_path. `node-mirror uninstall` removes this file.\n" +
		"version = 2\n\n" +
		"[plugins.\"io.containerd.grpc.v1.cri\".registry]\n" +
		"  config_path = " + tomlString(dir) + "\n"
}

// noteListDropped tells the operator which directories of a config_path list containerd
// stops reading once install has replaced the list with its first one, and which
// registries configured there that leaves unread.
func (pl *planner) noteListDropped(list, kept string) {
	for _, d := range filepath.SplitList(list)[1:] {
		if !filepath.IsAbs(d) {
			continue
		}
		ents, err := os.ReadDir(pl.plan.onDisk(d))
		if err != nil {
			continue // nothing there to lose
		}
		var regs []string
		for _, e := range ents {
			name := e.Name()
			if name == "_default" && slices.Contains(pl.opts.Registries, Wildcard) || slices.Contains(pl.opts.Registries, name) {
				continue // install writes its own hosts.toml for it in kept, which came first anyway
			}
			if e.IsDir() {
				if _, err := os.Stat(pl.plan.onDisk(filepath.Join(kept, e.Name()))); err != nil {
					regs = append(regs, name)
				}
			}
		}
		if len(regs) > 0 {
			pl.plan.note("containerd: config_path was the list %q, which containerd 2.x's CRI pulls read as one directory that does not exist (containerd#12808); "+
				"install sets it to %s alone, so the hosts configured in %s (%s) are no longer read: move them to %s",
				list, kept, pl.plan.onDisk(d), strings.Join(regs, ", "), pl.plan.onDisk(kept))
		}
	}
}

// hostsFiles plans <dir>/<registry>/hosts.toml for each registry.
func (pl *planner) hostsFiles(engine, dir string) []string {
	var paths []string
	for _, name := range pl.opts.Registries {
		sub := name
		if name == Wildcard {
			sub = "_default"
		}
		path := filepath.Join(dir, sub, "hosts.toml")
		h := hostsTOML{mirror: pl.mirror, server: serverFor(sub)}
		disk := pl.plan.onDisk(path)
		if pl.set(path, engine, kindHostsTOML, func(cur []byte) ([]byte, error) {
			return mergeHostsTOML(disk, cur, h, pl.state.MirrorURLs)
		}) {
			paths = append(paths, path)
		}
	}
	return paths
}

// serverFor is the real registry for a hosts.toml directory. _default has none, so
// containerd falls back to the host it was asked for; neither has a loopback registry,
// which containerd reaches over http by itself and an https server line would break.
func serverFor(dir string) string {
	host := dir
	if h, _, err := net.SplitHostPort(dir); err == nil {
		host = h
	}
	if dir == "_default" || host == "localhost" || net.ParseIP(host).IsLoopback() {
		return ""
	}
	return config.DefaultEndpoint(dir)
}

func registryOfHostsPath(path string) string { return filepath.Base(filepath.Dir(path)) }

const (
	dockerDaemonJSON = "/etc/docker/daemon.json"
	dockerCertsDir   = "/etc/docker/certs.d"
)

// docker plans daemon.json's registry-mirrors (which only ever applies to docker.io) and
// certs.d hosts.toml files, which Docker's containerd image store and BuildKit read.
func (pl *planner) docker() []string {
	var paths []string
	if slices.Contains(pl.opts.Registries, "docker.io") || slices.Contains(pl.opts.Registries, Wildcard) {
		disk := pl.plan.onDisk(dockerDaemonJSON)
		if pl.set(dockerDaemonJSON, Docker, kindDaemonJSON, func(cur []byte) ([]byte, error) {
			return mergeDaemonJSON(disk, cur, pl.mirror, pl.state.MirrorURLs)
		}) {
			paths = append(paths, dockerDaemonJSON)
			if c := pl.files[dockerDaemonJSON]; !bytes.Equal(c.old, c.new) {
				pl.noteDockerReload()
			}
		}
	} else {
		pl.plan.note("docker: docker.io is not mirrored, so daemon.json is left alone")
	}
	return append(paths, pl.hostsFiles(Docker, dockerCertsDir)...)
}

// crio plans the registries.conf.d drop-in.
func (pl *planner) crio() []string {
	st, err := readContainersConfs(pl.plan.root)
	if err != nil {
		pl.fail(err)
		return nil
	}
	regs := pl.opts.Registries
	if slices.Contains(regs, Wildcard) {
		regs = pl.opts.Served
		if len(regs) == 0 {
			regs = config.DefaultRegistries
		}
		for _, r := range regs {
			if err := regname.Check(r); err != nil {
				pl.fail(fmt.Errorf("registries served by the mirror: %w", err))
				return nil
			}
		}
		pl.plan.note("crio: registries.conf has no catch-all entry; mirroring the registries node-mirror serves: %s", strings.Join(regs, ", "))
	}
	for _, r := range regs {
		if c, ok := st.before[r]; ok {
			pl.plan.note("crio: %s's entry in %s is carried into our drop-in, which replaces it", r, pl.plan.onDisk(c.file))
		}
		if f, ok := st.after[r]; ok {
			pl.plan.note("crio: %s also configures %s and is read after our drop-in, so its entry wins and %s does not use the mirror", pl.plan.onDisk(f), r, r)
		}
	}
	path := filepath.Join(containersDropInDir, containersDropInName)
	pl.set(path, CRIO, kindContainersDropI, func([]byte) ([]byte, error) {
		return renderDropIn(pl.mirror, regs, st), nil
	})
	if c := pl.files[path]; c != nil && !bytes.Equal(c.old, c.new) {
		pl.plan.note("crio: CRI-O reads the drop-in on reload (systemctl reload crio); Podman and skopeo on their next run")
	}
	return []string{path}
}
