// Command node-mirror is a node-local pull-through registry mirror.
// This package only wires flags to the packages under pkg/.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func newApp() *cli.App {
	return &cli.App{
		Name:  "node-mirror",
		Usage: "node-local pull-through registry mirror",
		Commands: []*cli.Command{
			serveCommand(),
			installCommand(), uninstallCommand(),
			gcCommand(), statusCommand(), prefetchCommand(),
			versionCommand(),
		},
	}
}

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "node-mirror:", err)
		os.Exit(1)
	}
}

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version",
		Action: func(c *cli.Context) error {
			_, err := fmt.Fprintln(c.App.Writer, version)
			return err
		},
	}
}
