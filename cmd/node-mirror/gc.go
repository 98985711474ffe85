package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/node-mirror/node-mirror/internal/daemon"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
)

func mirrorURLFlag() cli.Flag {
	return &cli.StringFlag{Name: "mirror-url", Value: defaultMirrorURL, Usage: "the running node-mirror `URL`"}
}

// offlineFlags let gc and status work on a data dir when no daemon runs.
func offlineFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "data-dir", Usage: "work on this data `DIR` directly (only while no node-mirror serves it)"},
		&cli.StringFlag{Name: "config", Usage: "with --data-dir: read the cache budget from this TOML `FILE`"},
		&cli.StringFlag{Name: "max-size", Usage: "with --data-dir: the budget `SIZE` (20GiB or 10%)"},
		&cli.StringFlag{Name: "min-free", Usage: "with --data-dir: the free space floor `SIZE`"},
	}
}

// openOffline opens a data dir the way serve does, budget included. The store's lock
// makes it refuse while a daemon owns the dir.
func openOffline(c *cli.Context) (*contentstore.Store, error) {
	cfg := config.Default()
	if f := c.String("config"); f != "" {
		var err error
		if cfg, err = config.Load(f); err != nil {
			return nil, err
		}
	}
	if err := budgetFlags(c, &cfg); err != nil {
		return nil, err
	}
	s, err := contentstore.Open(c.String("data-dir"))
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, fmt.Errorf("%w\na node-mirror is serving this data dir: use --mirror-url instead", err)
	}
	if err != nil {
		return nil, err
	}
	s.SetBudget(daemon.Budget(cfg))
	return s, nil
}

func checkOnlineFlags(c *cli.Context) error {
	for _, f := range []string{"config", "max-size", "min-free"} {
		if c.IsSet(f) {
			return fmt.Errorf("--%s goes with --data-dir; a running node-mirror uses its own budget", f)
		}
	}
	return nil
}

func writeJSON(c *cli.Context, v any) error {
	enc := json.NewEncoder(c.App.Writer)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// isTerminal: progress bars only where someone watches them.
func isTerminal(w any) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func gcCommand() *cli.Command {
	return &cli.Command{
		Name:  "gc",
		Usage: "evict least recently used content down to the budget, remove orphaned downloads, print what was freed",
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "dry-run", Usage: "print what would be freed and change nothing"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
			mirrorURLFlag(),
		}, offlineFlags()...),
		Action: func(c *cli.Context) error {
			var rep contentstore.GCReport
			var err error
			if c.String("data-dir") != "" {
				s, oerr := openOffline(c)
				if oerr != nil {
					return oerr
				}
				defer s.Close()
				rep, err = s.Collect(c.Context, c.Bool("dry-run"))
			} else {
				if err := checkOnlineFlags(c); err != nil {
					return err
				}
				rep, err = (&admin.Client{URL: c.String("mirror-url")}).GC(c.Context, c.Bool("dry-run"))
			}
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return writeJSON(c, rep)
			}
			writeGC(c.App.Writer, rep)
			return nil
		},
	}
}
