package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

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
		mode := fs.FileMode(0o755)
		if d == filepath.Dir(StatePath) {
			mode = 0o700 // only root (only we) may write or read install state
		}
		if err := os.Mkdir(p.onDisk(d), mode); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating %s: %w", p.onDisk(d), err)
		}
	}
	statePath := p.onDisk(StatePath)
	if p.stateNew != nil && !bytes.Equal(p.stateOld, p.stateNew) {
		// A fresh file, 0600 and ours, whatever mode or owner the old one had.
		if err := writeAtomic(statePath, p.stateNew, fileInfo{}, 0o600); err != nil {
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
