package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/pkg/prefetch"
)

func prefetchCommand() *cli.Command {
	return &cli.Command{
		Name:      "prefetch",
		Usage:     "warm the cache of a running node-mirror with images",
		ArgsUsage: "IMAGE...",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "platform", Usage: "only this `OS/ARCH[/VARIANT]` of multi-platform images (default: all)"},
			&cli.StringFlag{Name: "from-file", Usage: "read image names from `FILE`, one a line (# comments)"},
			&cli.IntFlag{Name: "concurrency", Value: 4, Usage: "blobs fetched at once"},
			mirrorURLFlag(),
		},
		Action: func(c *cli.Context) error {
			images := c.Args().Slice()
			if f := c.String("from-file"); f != "" {
				more, err := prefetch.ReadImageList(f)
				if err != nil {
					return err
				}
				images = append(images, more...)
			}
			if len(images) == 0 {
				return errors.New("no images: name some, or give --from-file")
			}
			_, err := prefetch.Run(c.Context, prefetch.Options{
				MirrorURL: c.String("mirror-url"), Platform: c.String("platform"),
				Concurrency: c.Int("concurrency"), Out: c.App.Writer, Bars: isTerminal(c.App.Writer),
			}, images)
			if err != nil {
				return cli.Exit(fmt.Sprintf("node-mirror: not everything landed:\n%v", err), 1)
			}
			return nil
		},
	}
}
