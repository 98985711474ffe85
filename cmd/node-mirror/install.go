package main

import (
	"fmt"
	"net"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/hosts"
)

const defaultMirrorURL = "http://127.0.0.1:5000"

func installCommand() *cli.Command {
	return &cli.Command{
		Name:  "install",
		Usage: "point containerd, Docker and CRI-O/Podman on this host at the mirror",
		Description: "Writes containerd hosts.toml files (and config_path when containerd needs it), Docker's\n" +
			"daemon.json registry-mirrors and certs.d, and a registries.conf.d drop-in. Running it again\n" +
			"changes nothing; `node-mirror uninstall` puts every file back. State: " + hosts.StatePath,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "node-mirror TOML config `FILE`: its listen address and registries are the defaults"},
			&cli.StringFlag{Name: "root", Value: "/", Usage: "work on files below `DIR` instead of /"},
			&cli.StringFlag{Name: "mirror-url", Usage: "the mirror's `URL` (default " + defaultMirrorURL + ", or http://<listen> from --config)"},
			&cli.StringSliceFlag{Name: "registries", Usage: "registries to mirror, comma separated; '*' for all (default: the configured ones)"},
			&cli.StringSliceFlag{Name: "engines", Usage: "engines to configure: " + strings.Join(hosts.Engines, ",") + " (default: those found on the host)"},
			&cli.BoolFlag{Name: "dry-run", Usage: "print the changes as unified diffs and write nothing"},
			&cli.BoolFlag{Name: "reload", Usage: "send SIGHUP to dockerd and crio when their config changed"},
		},
		Action: install,
	}
}

func uninstallCommand() *cli.Command {
	return &cli.Command{
		Name:  "uninstall",
		Usage: "undo install: restore every file it changed",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Value: "/", Usage: "work on files below `DIR` instead of /"},
			&cli.BoolFlag{Name: "dry-run", Usage: "print the changes as unified diffs and write nothing"},
			&cli.BoolFlag{Name: "reload", Usage: "send SIGHUP to dockerd and crio when their config changed"},
		},
		Action: uninstall,
	}
}

func install(c *cli.Context) error {
	cfg := config.Default()
	if f := c.String("config"); f != "" {
		var err error
		if cfg, err = config.Load(f); err != nil {
			return err
		}
	}
	var served []string
	for _, r := range cfg.Registries {
		served = append(served, r.Name)
	}
	opts := hosts.Options{
		Root:       c.String("root"),
		MirrorURL:  c.String("mirror-url"),
		Registries: c.StringSlice("registries"),
		Served:     served,
		Engines:    c.StringSlice("engines"),
	}
	if opts.MirrorURL == "" {
		opts.MirrorURL = mirrorURLFromListen(cfg.Listen)
	}
	if len(opts.Registries) == 0 {
		opts.Registries = served
	}
	plan, err := hosts.Install(opts)
	if err != nil {
		return err
	}
	return finish(c, plan, "every engine already uses the mirror")
}

func uninstall(c *cli.Context) error {
	plan, err := hosts.Uninstall(c.String("root"))
	if err != nil {
		return err
	}
	return finish(c, plan, "")
}

// finish prints what a plan does and applies it unless --dry-run.
func finish(c *cli.Context, plan *hosts.Plan, nothing string) error {
	w := c.App.Writer
	if c.Bool("reload") {
		if err := plan.CheckReload(); err != nil {
			return err
		}
	}
	for _, n := range plan.Notes() {
		fmt.Fprintln(w, "note:", n)
	}
	if plan.Empty() {
		if nothing != "" {
			fmt.Fprintln(w, "nothing to change:", nothing)
		}
		return nil
	}
	if c.Bool("dry-run") {
		fmt.Fprintln(w, "dry run: nothing written")
		return plan.Diff(w)
	}
	if err := plan.Apply(); err != nil {
		return err
	}
	for _, s := range plan.Summary() {
		fmt.Fprintln(w, s)
	}
	if c.Bool("reload") {
		msgs, err := plan.Reload()
		for _, m := range msgs {
			fmt.Fprintln(w, m)
		}
		return err
	}
	return nil
}

// mirrorURLFromListen turns serve's listen address into a URL this host can reach: a
// wildcard address is reached on loopback.
func mirrorURLFromListen(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil || port == "" {
		return defaultMirrorURL
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return "http://" + net.JoinHostPort(host, port)
}
