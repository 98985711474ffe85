package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
)

// Uninstall plans undoing what install recorded.
func Uninstall(root string) (*Plan, error) {
	pl, err := newPlanner(root)
	if err != nil {
		return nil, err
	}
	st, stateBytes, err := pl.loadState()
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
	pl.plan.rmdirs = deepestFirst(st.CreatedDirs)
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
		if rec.Kind == kindDaemonJSON {
			// dockerd's reload keeps its old mirrors when the key is missing, and when the
			// file is (with --config-file the reload fails): say "none" instead.
			b, err := emptyMirrorsDaemonJSON(disk, rec.Original)
			if err != nil {
				pl.fail(err)
				return
			}
			switch {
			case !rec.Existed:
				pl.plan.note("%s did not exist before install; leaving it with \"registry-mirrors\": [] so a dockerd reload drops the mirror", disk)
			case !bytes.Equal(b, rec.Original):
				pl.plan.note("%s: registry-mirrors was not set before install; leaving it as [] so a dockerd reload drops the mirror", disk)
			}
			c.new = b
			pl.noteDockerReload()
			return
		}
		if !rec.Existed {
			c.remove, c.new = true, nil
			return
		}
		c.new = rec.Original
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
	if rec.Kind == kindDaemonJSON && c.changed() {
		pl.noteDockerReload()
	}
}

const dockerReloadNote = "docker: registry-mirrors changed; dockerd reads it on reload (--reload, or systemctl reload docker)"

func (pl *planner) noteDockerReload() {
	if !slices.Contains(pl.plan.notes, dockerReloadNote) {
		pl.plan.note("%s", dockerReloadNote)
	}
}
