package hosts

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
)

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
	st, stateBytes, err := pl.loadState()
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
		pl.plan.rmdirs = deepestFirst(st.CreatedDirs)
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
