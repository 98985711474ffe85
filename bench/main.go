// Command bench is `make bench`: it measures node-mirror against the reference registry's
// proxy mode (Debian's docker-registry, distribution 2.8) and an nginx static-file ceiling,
// all on loopback, and writes the results to docs/BENCHMARKS.md.
//
// Everything runs on 127.0.0.1: an upstream docker-registry seeded with generated images,
// node-mirror and the reference proxy in front of it (each through its own throttling
// proxy that adds latency and caps bandwidth per connection, like an internet registry),
// nginx serving node-mirror's blob files, and a private containerd for the pull scenario.
// Every process it starts is stopped when it ends, also on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	out        string
	profileDir string
	workDir    string
	keep       bool
	bin        string
	only       string

	rtt       time.Duration
	bandwidth float64 // MB/s per connection

	repeat     int
	coldRepeat int
	duration   time.Duration

	blobSize    sizeFlag
	blobClients int
	conns       int
	herdSize    sizeFlag
	herdClients int
	pullSize    sizeFlag
	pullLayers  int
	freshness   time.Duration

	coldSize       sizeFlag
	containerd2Dir string
	sweepChunks    []int64
	sweepConc      []int
	sweepRepeat    int

	uplink       float64 // MB/s shared by every connection of a fleet scenario's group
	fleetSize    sizeFlag
	fleetLayers  int
	fleetNodes   []int
	fleetRepeat  int
	fleetProfile time.Duration
}

func main() {
	o := options{blobSize: 256 << 20, herdSize: 128 << 20, pullSize: 64 << 20, coldSize: 512 << 20, fleetSize: 256 << 20}
	flag.StringVar(&o.out, "out", "docs/BENCHMARKS.md", "write the Markdown report here (\"\" for stdout only)")
	flag.StringVar(&o.profileDir, "profile-dir", "bench/out", "where node-mirror's CPU and heap profiles of the hot scenarios go")
	flag.StringVar(&o.workDir, "work-dir", "", "scratch directory (default: a new temp dir, removed at the end)")
	flag.BoolVar(&o.keep, "keep", false, "keep the scratch directory for inspection: logs, and the stores of the long-lived servers (those of the per-run caches are removed, they would fill the disk)")
	flag.StringVar(&o.bin, "node-mirror", "bin/node-mirror", "the node-mirror binary")
	flag.StringVar(&o.only, "only", "", "comma-separated subset of scenarios: blob,digest,tag,fresh,herd,pull,cold,ctrcold,sweep,fleet (default all)")
	flag.DurationVar(&o.rtt, "latency", 20*time.Millisecond, "round-trip time the throttle adds between a cache and the upstream")
	flag.Float64Var(&o.bandwidth, "bandwidth", 40, "per-connection bandwidth cap of the throttle, in MB/s (10^6 bytes)")
	flag.IntVar(&o.repeat, "repeat", 5, "runs per contender of each hot scenario (blob, digest, tag)")
	flag.IntVar(&o.coldRepeat, "cold-repeat", 3, "runs per contender of each cold scenario (herd, pull)")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of one hot run")
	flag.Var(&o.blobSize, "blob-size", "size of the warm blob of the throughput scenario")
	flag.IntVar(&o.blobClients, "blob-clients", 4, "concurrent clients of the throughput scenario")
	flag.IntVar(&o.conns, "conns", 16, "connections of the manifest scenarios")
	flag.Var(&o.herdSize, "herd-size", "size of the cold blob of the herd scenario")
	flag.IntVar(&o.herdClients, "herd-clients", 16, "clients of the herd scenario")
	flag.Var(&o.pullSize, "pull-size", "total size of the image of the containerd pull scenario")
	flag.IntVar(&o.pullLayers, "pull-layers", 8, "layers of the image of the containerd pull scenario")
	flag.DurationVar(&o.freshness, "tag-freshness", 10*time.Second, "node-mirror's tag freshness window as shipped (the freshness check's bound)")
	flag.Var(&o.coldSize, "cold-size", "size of the 1-layer image of the cold scenarios (cold, ctrcold, sweep)")
	flag.StringVar(&mirrorLogLevel, "log-level", mirrorLogLevel, "--log-level of the node-mirror daemons (their logs are in the scratch dir; see -keep)")
	flag.StringVar(&o.containerd2Dir, "containerd2-dir", os.Getenv("CONTAINERD2_DIR"), "directory with containerd 2.x's containerd and ctr, for scenario 9 beside Debian's (`make containerd2`)")
	sweepChunks := flag.String("sweep-chunks", "4MiB,8MiB,16MiB,32MiB", "chunk sizes of the sweep")
	sweepConc := flag.String("sweep-concurrency", "1,2,4,8", "fetch concurrencies of the sweep")
	flag.IntVar(&o.sweepRepeat, "sweep-repeat", 2, "runs per point of the sweep")
	flag.Float64Var(&o.uplink, "uplink", 160, "the fleet scenario's shared uplink: MB/s over all connections to the upstream")
	flag.Var(&o.fleetSize, "fleet-size", "total size of the image of the fleet scenario")
	flag.IntVar(&o.fleetLayers, "fleet-layers", 2, "layers of the image of the fleet scenario")
	fleetNodes := flag.String("fleet-nodes", "4,8", "cluster sizes of the fleet scenario")
	flag.IntVar(&o.fleetRepeat, "fleet-repeat", 3, "runs per cluster size and mode of the fleet scenario")
	flag.DurationVar(&o.fleetProfile, "fleet-profile", 4*time.Second, "CPU profile of node-1 over the first part of every fleet run (0: none; -profile-dir \"\" turns all off)")
	quick := flag.Bool("quick", false, "scale everything down for a fast smoke run (2 runs, 1s, small blobs); figures are then rough")
	flag.Parse()
	var err error
	if o.sweepChunks, err = parseList(*sweepChunks, parseSize); err != nil {
		fmt.Fprintf(os.Stderr, "bench: -sweep-chunks: %v\n", err)
		os.Exit(2)
	}
	if o.sweepConc, err = parseList(*sweepConc, strconv.Atoi); err != nil {
		fmt.Fprintf(os.Stderr, "bench: -sweep-concurrency: %v\n", err)
		os.Exit(2)
	}
	if o.fleetNodes, err = parseList(*fleetNodes, strconv.Atoi); err != nil {
		fmt.Fprintf(os.Stderr, "bench: -fleet-nodes: %v\n", err)
		os.Exit(2)
	}
	if *quick {
		o.repeat, o.coldRepeat, o.duration = 2, 1, time.Second
		o.blobSize, o.herdSize, o.pullSize = 64<<20, 32<<20, 16<<20
		o.coldSize, o.fleetSize, o.sweepRepeat, o.fleetRepeat = 64<<20, 64<<20, 1, 1
	}
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")

	if missing := missingTools(); len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "bench: missing %s; install with (as root):\n  apt-get install -y docker-registry nginx containerd\n", strings.Join(missing, ", "))
		os.Exit(2)
	}
	if _, err := os.Stat(o.bin); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v (build it with `make build`)\n", err)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = run(ctx, &o)
	stopAll()
	if err != nil {
		log.Printf("FAILED: %v", err)
		os.Exit(1)
	}
}

func (o *options) want(scenario string) bool {
	if o.only == "" {
		return true
	}
	for _, s := range strings.Split(o.only, ",") {
		if strings.TrimSpace(s) == scenario {
			return true
		}
	}
	return false
}

func run(ctx context.Context, o *options) (err error) {
	work := o.workDir
	if work == "" {
		if work, err = os.MkdirTemp("", "nmbench-"); err != nil {
			return err
		}
		if !o.keep {
			defer func() {
				stopAll() // nothing may still write there
				os.RemoveAll(work)
			}()
		}
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	if o.bin, err = filepath.Abs(o.bin); err != nil {
		return err
	}
	log.Printf("scratch dir %s", work)
	started := time.Now()
	b, err := setup(ctx, o, work)
	if b != nil {
		defer b.close()
	}
	if err != nil {
		return err
	}
	if o.out != "" {
		b.loadPrevious(o.out)
	}
	if err := b.runScenarios(ctx); err != nil {
		return err
	}
	b.elapsed = time.Since(started)
	report := b.report()
	if o.out == "" {
		fmt.Print(report)
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		fmt.Print(report) // the run's figures are not lost
		return err
	}
	if err := os.WriteFile(o.out, []byte(report), 0o644); err != nil {
		fmt.Print(report)
		return err
	}
	log.Printf("wrote %s in %v", o.out, b.elapsed.Round(time.Second))
	return nil
}
