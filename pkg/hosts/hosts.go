// Package hosts points the container engines on a host at the node-local mirror, and takes
// that back again: containerd hosts.toml files and config_path, Docker's daemon.json and
// certs.d, and a containers registries.conf.d drop-in (CRI-O, Podman, skopeo).
//
// Install and Uninstall only read and plan; nothing is written until Plan.Apply, so a file
// that does not parse stops the whole run before any file changed. Apply writes each file
// atomically and records what it changed in StatePath, which Uninstall uses to restore
// each file byte for byte, or, when someone edited a file since, to remove only our entries.
package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/node-mirror/node-mirror/pkg/config"
)

// Engines install knows, in the order it configures them.
const (
	Containerd = "containerd"
	Docker     = "docker"
	CRIO       = "crio"
)

// Engines lists every engine install can configure.
var Engines = []string{Containerd, Docker, CRIO}

// Wildcard as the only registry mirrors every registry (containerd's _default).
const Wildcard = "*"

// Options say what install does.
type Options struct {
	// Root is the directory that stands for / (as systemctl --root); "" means /.
	Root string
	// MirrorURL is where the mirror listens, e.g. http://127.0.0.1:5000.
	MirrorURL string
	// Registries are the registries to pull through the mirror, as clients name them;
	// []string{"*"} means all (containerd's _default hosts.toml).
	Registries []string
	// Served are the registries the mirror serves; containers/image has no catch-all entry,
	// so with "*" its drop-in lists these. Empty means config.DefaultRegistries.
	Served []string
	// Engines to configure; empty means every engine found on the host.
	Engines []string
}

// Plan is the set of file changes install or uninstall would make.
type Plan struct {
	root    string
	changes []*Change
	notes   []string
	// mkdirs are created before writing, outermost first.
	mkdirs []string
	// rmdirs are removed after writing when empty, innermost first.
	rmdirs []string
	// stateOld and stateNew are the state file's bytes before and after; stateNew nil
	// removes it.
	stateOld, stateNew []byte
}

// Change is one file install or uninstall writes or removes.
type Change struct {
	// Path is the file's path on the host (without the root).
	Path   string
	Engine string
	kind   string
	old    []byte
	new    []byte
	exists bool // the file exists now
	remove bool
	info   fileInfo
}

// changed tells whether the change writes or removes anything.
func (c *Change) changed() bool {
	if c.remove {
		return c.exists
	}
	if !c.exists {
		return c.new != nil
	}
	return !bytes.Equal(c.old, c.new)
}

// Changes are the files that would change.
func (p *Plan) Changes() []*Change { return p.changes }

// Notes are things the operator should know: engines skipped, restarts needed, entries
// carried over.
func (p *Plan) Notes() []string { return p.notes }

// Empty tells whether applying would change nothing.
func (p *Plan) Empty() bool {
	return len(p.changes) == 0 && bytes.Equal(p.stateOld, p.stateNew)
}

func (p *Plan) note(format string, args ...any) {
	p.notes = append(p.notes, fmt.Sprintf(format, args...))
}

// onDisk is a path below the root.
func (p *Plan) onDisk(path string) string { return filepath.Join(p.root, path) }

// Diff writes a unified diff of every change.
func (p *Plan) Diff(w io.Writer) error {
	for _, c := range p.changes {
		from, to := p.onDisk(c.Path), p.onDisk(c.Path)
		if !c.exists {
			from = "/dev/null"
		}
		if c.remove {
			to = "/dev/null"
		}
		if err := unifiedDiff(w, from, to, c.old, c.new); err != nil {
			return err
		}
	}
	return nil
}

// Summary says what each change does, one line each.
func (p *Plan) Summary() []string {
	var out []string
	for _, c := range p.changes {
		verb := "update"
		switch {
		case c.remove:
			verb = "remove"
		case !c.exists:
			verb = "create"
		}
		out = append(out, fmt.Sprintf("%s %s (%s)", verb, p.onDisk(c.Path), c.Engine))
	}
	return out
}

// Apply makes the changes. Directories come first, then the state record (so a crash part
// way leaves a record uninstall can work from), then each file, atomically.
func (p *Plan) Apply() error {
	for _, d := range p.mkdirs {
		if err := os.Mkdir(p.onDisk(d), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating %s: %w", p.onDisk(d), err)
		}
	}
	statePath := p.onDisk(StatePath)
	if p.stateNew != nil && !bytes.Equal(p.stateOld, p.stateNew) {
		_, _, info, err := readFile(statePath)
		if err != nil {
			return err
		}
		if err := writeAtomic(statePath, p.stateNew, info, 0o600); err != nil {
			return err
		}
	}
	for _, c := range p.changes {
		var err error
		if c.remove {
			err = removeFile(p.onDisk(c.Path))
		} else {
			err = writeAtomic(p.onDisk(c.Path), c.new, c.info, 0o644)
		}
		if err != nil {
			return err
		}
	}
	if p.stateNew == nil && p.stateOld != nil {
		if err := removeFile(statePath); err != nil {
			return err
		}
	}
	for _, d := range p.rmdirs {
		// Only empty directories go; anything someone put there since stays.
		if err := os.Remove(p.onDisk(d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if ents, rerr := os.ReadDir(p.onDisk(d)); rerr == nil && len(ents) > 0 {
				continue
			}
			return fmt.Errorf("removing %s: %w", p.onDisk(d), err)
		}
	}
	return nil
}

// planner collects file contents and changes while a plan is built.
type planner struct {
	plan   *Plan
	state  *installState
	opts   Options
	mirror string
	files  map[string]*Change // by host path, read once
	errs   []error
}

func newPlanner(root string) (*planner, error) {
	if root == "" {
		root = "/"
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("--root %s: %w", root, err)
	}
	if fi, err := os.Stat(abs); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("--root %s: not a directory", root)
	}
	return &planner{plan: &Plan{root: abs}, files: map[string]*Change{}}, nil
}

// read returns the current content of a host path, read once per plan.
func (pl *planner) read(path, engine, kind string) (*Change, error) {
	if c, ok := pl.files[path]; ok {
		return c, nil
	}
	b, ok, info, err := readFile(pl.plan.onDisk(path))
	if err != nil {
		return nil, err
	}
	c := &Change{Path: path, Engine: engine, kind: kind, old: b, new: b, exists: ok, info: info}
	pl.files[path] = c
	return c, nil
}

// fail remembers an error and keeps planning, so one run reports every broken file.
func (pl *planner) fail(err error) {
	pl.errs = append(pl.errs, err)
}

// Install plans pointing the engines at the mirror.
func Install(o Options) (*Plan, error) {
	pl, err := newPlanner(o.Root)
	if err != nil {
		return nil, err
	}
	if pl.mirror, err = normalizeMirrorURL(o.MirrorURL); err != nil {
		return nil, err
	}
	if o.Registries, err = normalizeRegistries(o.Registries); err != nil {
		return nil, err
	}
	pl.opts = o
	st, stateBytes, err := loadState(pl.plan.root)
	if err != nil {
		return nil, err
	}
	pl.plan.stateOld = stateBytes
	if st == nil {
		st = &installState{Version: stateVersion}
	}
	pl.state = st
	engines, err := pl.engines(o.Engines)
	if err != nil {
		return nil, err
	}
	var planned []string // host paths install wants to own
	for _, e := range engines {
		var paths []string
		switch e {
		case Containerd:
			paths = pl.containerd()
		case Docker:
			paths = pl.docker()
		case CRIO:
			paths = pl.crio()
		}
		planned = append(planned, paths...)
	}
	// Files an earlier install changed that this one no longer wants (a registry dropped
	// from --registries, say) go back to how they were, for the engines handled now.
	for _, rec := range st.Files {
		if !slices.Contains(planned, rec.Path) && slices.Contains(engines, rec.Engine) {
			pl.revert(rec, st.MirrorURLs)
		}
	}
	if err := errors.Join(pl.errs...); err != nil {
		return nil, fmt.Errorf("nothing was changed: %w", err)
	}
	return pl.finishInstall(planned)
}

// finishInstall turns the contents read and computed into changes and a new state record.
func (pl *planner) finishInstall(planned []string) (*Plan, error) {
	st := pl.state
	urls := []string{pl.mirror}
	for _, u := range st.MirrorURLs {
		if u != pl.mirror {
			urls = append(urls, u)
		}
	}
	next := installState{Version: stateVersion, MirrorURLs: urls, CreatedDirs: slices.Clone(st.CreatedDirs)}
	records := map[string]fileRecord{}
	for _, r := range st.Files {
		if _, seen := pl.files[r.Path]; !seen {
			records[r.Path] = r // an engine not handled in this run
		}
	}
	var dirs []string
	for _, path := range sortedKeys(pl.files) {
		c := pl.files[path]
		rec := st.record(path)
		changed := c.changed()
		if changed {
			pl.plan.changes = append(pl.plan.changes, c)
			if !c.remove {
				d, err := missingDirs(pl.plan.root, filepath.Dir(path))
				if err != nil {
					return nil, err
				}
				dirs = append(dirs, d...)
			}
		}
		if !slices.Contains(planned, path) {
			continue // reverted: no longer ours
		}
		if rec == nil && !changed {
			continue // already as we want it, and not by our doing
		}
		r := fileRecord{Path: path, Engine: c.Engine, Kind: c.kind, Existed: c.exists, Original: c.old, OriginalSHA256: sum(c.old)}
		if rec != nil {
			r = *rec
			cur := sum(c.old)
			if cur != rec.InstalledSHA256 && cur != rec.OriginalSHA256 {
				r.Diverged = true
			}
		}
		r.InstalledSHA256 = sum(c.new)
		pl.annotate(&r)
		records[r.Path] = r
	}
	for _, path := range sortedKeys(records) {
		next.Files = append(next.Files, records[path])
	}
	if len(next.Files) > 0 {
		sd, err := missingDirs(pl.plan.root, filepath.Dir(StatePath))
		if err != nil {
			return nil, err
		}
		dirs = append(dirs, sd...)
	}
	for _, d := range dirs {
		if !slices.Contains(pl.plan.mkdirs, d) {
			pl.plan.mkdirs = append(pl.plan.mkdirs, d)
		}
		if !slices.Contains(next.CreatedDirs, d) {
			next.CreatedDirs = append(next.CreatedDirs, d)
		}
	}
	// Directories must be created parents first.
	slices.SortStableFunc(pl.plan.mkdirs, func(a, b string) int { return strings.Count(a, "/") - strings.Count(b, "/") })
	if len(next.Files) > 0 {
		pl.plan.stateNew = next.encode()
	} else if len(pl.plan.changes) > 0 {
		// Everything we had changed was put back: nothing left to record.
		pl.plan.rmdirs = reversed(st.CreatedDirs)
	} else {
		pl.plan.stateNew = pl.plan.stateOld
	}
	return pl.plan, nil
}

// annotate fills in what uninstall needs to know to undo a file's merge.
func (pl *planner) annotate(r *fileRecord) {
	switch r.Kind {
	case kindHostsTOML:
		if d, err := parseTOML(r.Path, r.Original); err == nil && isBlank(d) {
			r.AddedServer = serverFor(registryOfHostsPath(r.Path))
		}
	case kindContainerdConf:
		_, c, err := readContainerdConfig(r.Path, pl.files[r.Path].new)
		if err == nil {
			r.ConfigPath = c.configPath
		}
	}
}

// Uninstall plans undoing what install recorded.
func Uninstall(root string) (*Plan, error) {
	pl, err := newPlanner(root)
	if err != nil {
		return nil, err
	}
	st, stateBytes, err := loadState(pl.plan.root)
	if err != nil {
		return nil, err
	}
	if st == nil {
		pl.plan.note("nothing to undo: %s does not exist", pl.plan.onDisk(StatePath))
		return pl.plan, nil
	}
	pl.plan.stateOld = stateBytes
	for _, rec := range st.Files {
		pl.revert(rec, st.MirrorURLs)
	}
	if err := errors.Join(pl.errs...); err != nil {
		return nil, fmt.Errorf("nothing was changed: %w", err)
	}
	for _, path := range sortedKeys(pl.files) {
		c := pl.files[path]
		if c.changed() {
			pl.plan.changes = append(pl.plan.changes, c)
		}
	}
	pl.plan.rmdirs = reversed(st.CreatedDirs)
	return pl.plan, nil
}

// revert plans putting one recorded file back.
func (pl *planner) revert(rec fileRecord, mirrors []string) {
	c, err := pl.read(rec.Path, rec.Engine, rec.Kind)
	if err != nil {
		pl.fail(err)
		return
	}
	disk := pl.plan.onDisk(rec.Path)
	if !c.exists {
		pl.plan.note("%s is gone already; leaving it so", disk)
		return
	}
	cur := sum(c.old)
	switch {
	case cur == rec.InstalledSHA256 && !rec.Diverged:
		if !rec.Existed {
			c.remove, c.new = true, nil
			return
		}
		c.new = rec.Original
		if rec.Kind == kindDaemonJSON {
			// dockerd's reload keeps old mirrors when the key is missing; say "none" instead.
			b, err := emptyMirrorsDaemonJSON(disk, rec.Original)
			if err != nil {
				pl.fail(err)
				return
			}
			if !bytes.Equal(b, rec.Original) {
				pl.plan.note("%s: registry-mirrors was not set before install; leaving it as [] so a reload drops the mirror", disk)
			}
			c.new = b
		}
		return
	case cur == rec.OriginalSHA256:
		return
	}
	var b []byte
	switch rec.Kind {
	case kindHostsTOML:
		b, err = unmergeHostsTOML(disk, c.old, mirrors, rec.AddedServer)
	case kindContainerdConf:
		b, err = revertConfigPath(disk, c.old, rec.Original, rec.ConfigPath)
	case kindDaemonJSON:
		b, err = unmergeDaemonJSON(disk, c.old, mirrors)
	case kindContainersDropI:
		b, err = unmergeDropIn(disk, c.old, mirrors)
	default:
		err = fmt.Errorf("%s: unknown kind %q in %s", disk, rec.Kind, pl.plan.onDisk(StatePath))
	}
	if err != nil {
		pl.fail(err)
		return
	}
	if b == nil {
		c.remove, c.new = true, nil
	} else {
		c.new = b
	}
	pl.plan.note("%s was changed since install: removing only node-mirror's entries", disk)
}

// set records the content install wants for a file.
func (pl *planner) set(path, engine, kind string, merge func(cur []byte) ([]byte, error)) bool {
	c, err := pl.read(path, engine, kind)
	if err != nil {
		pl.fail(err)
		return false
	}
	if c.new != nil && !bytes.Equal(c.new, c.old) {
		return true // planned already (containerd and Docker sharing a hosts directory)
	}
	b, err := merge(c.old)
	if err != nil {
		pl.fail(err)
		return false
	}
	c.new = b
	return true
}

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
	if !c.exists {
		pl.plan.note("containerd: no %s; containerd 2.x reads %s by default, 1.x needs "+
			"config_path = %q in its CRI registry table (plugins.\"io.containerd.grpc.v1.cri\".registry) for Kubernetes pulls",
			disk, dir, dir)
	} else {
		d, cfg, err := readContainerdConfig(disk, c.old)
		if err != nil {
			pl.fail(err)
			return nil
		}
		var needsSet bool
		dir, needsSet = cfg.hostsDir()
		if needsSet {
			b, err := setConfigPath(disk, d, cfg, dir)
			if err != nil {
				pl.fail(err)
				return nil
			}
			c.new = b
			paths = append(paths, containerdConfigFile)
			pl.plan.note("containerd: set config_path = %q in %s; restart containerd to read it (systemctl restart containerd; running containers keep running)", dir, disk)
		} else if r := pl.state.record(containerdConfigFile); r != nil {
			// An earlier install set config_path; it is still ours to undo.
			paths = append(paths, containerdConfigFile)
		}
	}
	paths = append(paths, pl.hostsFiles(Containerd, dir)...)
	return paths
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
				pl.plan.note("docker: registry-mirrors changed; dockerd reads it on reload (--reload, or systemctl reload docker)")
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

// normalizeMirrorURL checks the mirror URL and drops a trailing slash.
func normalizeMirrorURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("--mirror-url %q: want http(s)://host:port", s)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// normalizeRegistries checks registry names (host[:port]) and drops duplicates.
func normalizeRegistries(in []string) ([]string, error) {
	var out []string
	for _, r := range in {
		r = strings.TrimSpace(r)
		if r == "" || slices.Contains(out, r) {
			continue
		}
		if r != Wildcard {
			u, err := url.Parse("https://" + r)
			if err != nil || u.Host != r || strings.ContainsAny(r, "/?#@") {
				return nil, fmt.Errorf("registry %q is not a host[:port]", r)
			}
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, errors.New("no registries to mirror")
	}
	if len(out) > 1 && slices.Contains(out, Wildcard) {
		return nil, fmt.Errorf("%q mirrors every registry; give it alone", Wildcard)
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func reversed(s []string) []string {
	out := slices.Clone(s)
	slices.SortStableFunc(out, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return out
}
