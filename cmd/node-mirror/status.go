package main

import (
	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/pkg/admin"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the cache: size, budget, entries, hit ratio, bytes saved, top repositories",
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print JSON for scripts"},
			mirrorURLFlag(),
		}, offlineFlags()...),
		Action: func(c *cli.Context) error {
			var st admin.Status
			if c.String("data-dir") != "" {
				s, err := openOffline(c)
				if err != nil {
					return err
				}
				defer s.Close()
				stats, err := s.Stats(c.Context, admin.TopRepos)
				if err != nil {
					return err
				}
				st = admin.Status{Source: "data-dir", Store: stats}
			} else {
				if err := checkOnlineFlags(c); err != nil {
					return err
				}
				var err error
				if st, err = (&admin.Client{URL: c.String("mirror-url")}).Status(c.Context); err != nil {
					return err
				}
			}
			if c.Bool("json") {
				return writeJSON(c, st)
			}
			writeStatus(c.App.Writer, st)
			return nil
		},
	}
}
