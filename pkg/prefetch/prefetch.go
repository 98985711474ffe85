// Package prefetch warms a running node-mirror: it resolves images through the mirror's
// own /v2/ API and reads every blob through it, so what it reports as landed is what the
// mirror verified and stored.
package prefetch

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/platforms"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/node-mirror/node-mirror/internal/cachehdr"
	"github.com/node-mirror/node-mirror/internal/humanize"
	"github.com/node-mirror/node-mirror/internal/platformpick"
)

var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}, ", ")

// Options configure a prefetch.
type Options struct {
	MirrorURL string // e.g. http://127.0.0.1:5000
	// Platform ("linux/amd64") picks one image of each index; empty fetches all.
	Platform string
	// Concurrency bounds blobs fetched at once (default 4).
	Concurrency int
	Out         io.Writer
	// Bars draws live per-layer progress bars (for a terminal); otherwise one plain line
	// per blob as it completes.
	Bars bool
	HTTP *http.Client
}

// Result counts what landed.
type Result struct {
	Images, Blobs, Cached, Fetched, Failed int
	Bytes                                  int64
}

// ReadImageList reads image names, one a line; blank lines and # comments are skipped.
func ReadImageList(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, line)
		}
	}
	return out, sc.Err()
}

type blob struct {
	image string
	reg   string
	repo  string
	desc  ocispec.Descriptor
}

type prefetcher struct {
	opts  Options
	base  string
	match platforms.MatchComparer
	mu    sync.Mutex
	res   Result
	bars  []*bar
	out   io.Writer
	lines int // lines drawn by the last redraw
	errs  []error
}

// Run prefetches images and reports what landed. The error lists what did not.
func Run(ctx context.Context, o Options, images []string) (Result, error) {
	if o.Concurrency <= 0 {
		o.Concurrency = 4
	}
	if o.HTTP == nil {
		o.HTTP = &http.Client{}
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	p := &prefetcher{opts: o, base: strings.TrimSuffix(o.MirrorURL, "/"), out: o.Out}
	if o.Platform != "" {
		pl, err := platforms.Parse(o.Platform)
		if err != nil {
			return Result{}, fmt.Errorf("--platform %q: %w", o.Platform, err)
		}
		p.match = platforms.Only(pl)
	}
	var blobs []blob
	seen := map[digest.Digest]bool{}
	for _, img := range images {
		bs, err := p.resolve(ctx, img)
		if err != nil {
			p.errs = append(p.errs, fmt.Errorf("%s: %w", img, err))
			fmt.Fprintf(p.out, "%s: FAILED: %v\n", img, err)
			continue
		}
		p.res.Images++
		for _, b := range bs {
			if !seen[b.desc.Digest] {
				seen[b.desc.Digest] = true
				blobs = append(blobs, b)
			}
		}
	}
	p.res.Blobs = len(blobs)
	for _, b := range blobs {
		p.bars = append(p.bars, &bar{name: b.image + " " + short(b.desc.Digest), total: b.desc.Size})
	}
	stop := make(chan struct{})
	drawn := make(chan struct{})
	go func() {
		defer close(drawn)
		if !o.Bars {
			return
		}
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			p.redraw()
			select {
			case <-stop:
				p.redraw()
				return
			case <-t.C:
			}
		}
	}()
	sem := make(chan struct{}, o.Concurrency)
	var wg sync.WaitGroup
	for i, b := range blobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			p.fetch(ctx, b, p.bars[i])
		}()
	}
	wg.Wait()
	close(stop)
	<-drawn
	r := p.res
	fmt.Fprintf(p.out, "prefetched %d of %d images: %d blobs (%s), %d fetched, %d already cached, %d failed\n",
		r.Images, len(images), r.Blobs, humanize.Bytes(r.Bytes), r.Fetched, r.Cached, r.Failed)
	return r, errors.Join(p.errs...)
}

func short(d digest.Digest) string {
	e := d.Encoded()
	return d.Algorithm().String() + ":" + e[:min(12, len(e))]
}

// resolve walks an image's manifests through the mirror and lists its blobs.
func (p *prefetcher) resolve(ctx context.Context, image string) ([]blob, error) {
	ref, err := name.ParseReference(image)
	if err != nil {
		return nil, err
	}
	reg := ref.Context().RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	repo := ref.Context().RepositoryStr()
	return p.walk(ctx, image, reg, repo, ref.Identifier(), 0)
}

func (p *prefetcher) walk(ctx context.Context, image, reg, repo, ref string, depth int) ([]blob, error) {
	if depth > 2 {
		return nil, errors.New("index nested too deep")
	}
	body, err := p.get(ctx, reg, repo, "manifests/"+ref, manifestAccept)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Manifests []ocispec.Descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", ref, err)
	}
	var out []blob
	if doc.Manifests != nil {
		children := doc.Manifests
		if p.match != nil {
			best, ok := platformpick.Best(p.match, doc.Manifests)
			if !ok {
				return nil, fmt.Errorf("no image for platform %s", p.opts.Platform)
			}
			children = []ocispec.Descriptor{best}
		}
		for _, c := range children {
			bs, err := p.walk(ctx, image, reg, repo, c.Digest.String(), depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, bs...)
		}
		return out, nil
	}
	if doc.Config != nil {
		out = append(out, blob{image: image, reg: reg, repo: repo, desc: *doc.Config})
	}
	for _, l := range doc.Layers {
		out = append(out, blob{image: image, reg: reg, repo: repo, desc: l})
	}
	return out, nil
}

func (p *prefetcher) url(reg, repo, path string) string {
	return p.base + "/v2/" + repo + "/" + path + "?ns=" + url.QueryEscape(reg)
}

func (p *prefetcher) get(ctx context.Context, reg, repo, path, accept string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url(reg, repo, path), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", accept)
	resp, err := p.opts.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reaching node-mirror: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("%s: %s %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	return io.ReadAll(io.LimitReader(resp.Body, 8<<20))
}

// fetch reads one blob through the mirror. The mirror holds back a blob's last byte until
// it verified and stored it, so a complete read of a hit or miss means it landed; a
// pass-through (disk full) did not, and neither did an answer that does not say.
func (p *prefetcher) fetch(ctx context.Context, b blob, br *bar) {
	err := func() error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url(b.reg, b.repo, "blobs/"+b.desc.Digest.String()), nil)
		if err != nil {
			return err
		}
		resp, err := p.opts.HTTP.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", resp.Status)
		}
		br.setState(resp.Header.Get(cachehdr.Header))
		v := b.desc.Digest.Verifier()
		n, err := io.Copy(io.MultiWriter(v, br), resp.Body)
		if err != nil {
			return err
		}
		if n != b.desc.Size || !v.Verified() {
			return fmt.Errorf("got %d bytes not matching the digest", n)
		}
		switch br.state {
		case cachehdr.Hit, cachehdr.Miss:
			return nil
		case cachehdr.PassThrough:
			return errors.New("served but not stored (the mirror's disk is full or its budget is in use)")
		}
		return fmt.Errorf("served, but the answer does not say whether it was stored (%s: %q): is this a node-mirror?", cachehdr.Header, br.state)
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	br.done, br.err = true, err
	if err != nil {
		p.res.Failed++
		p.errs = append(p.errs, fmt.Errorf("%s %s: %w", b.image, b.desc.Digest, err))
	} else {
		p.res.Bytes += b.desc.Size
		if br.state == cachehdr.Hit {
			p.res.Cached++
		} else {
			p.res.Fetched++
		}
	}
	if !p.opts.Bars {
		fmt.Fprintln(p.out, br.line())
	}
}

// bar is one blob's progress.
type bar struct {
	name  string
	total int64
	mu    sync.Mutex
	n     int64
	state string
	done  bool
	err   error
}

func (b *bar) Write(p []byte) (int, error) {
	b.mu.Lock()
	b.n += int64(len(p))
	b.mu.Unlock()
	return len(p), nil
}

func (b *bar) setState(s string) {
	b.mu.Lock()
	b.state = s
	b.mu.Unlock()
}

func (b *bar) line() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	status := map[string]string{cachehdr.Hit: "cached", cachehdr.Miss: "fetched", cachehdr.PassThrough: "not stored"}[b.state]
	switch {
	case b.err != nil:
		return fmt.Sprintf("%s FAILED: %v", b.name, b.err)
	case b.done:
		return fmt.Sprintf("%s %s %s", b.name, humanize.Bytes(b.total), status)
	}
	const width = 30
	frac := 0.0
	if b.total > 0 {
		frac = float64(b.n) / float64(b.total)
	}
	fill := int(frac * width)
	return fmt.Sprintf("%s [%s%s] %3.0f%% %s/%s", b.name, strings.Repeat("=", fill), strings.Repeat(" ", width-fill),
		100*frac, humanize.Bytes(b.n), humanize.Bytes(b.total))
}

// redraw repaints every bar in place (ANSI: cursor up, clear line).
func (p *prefetcher) redraw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	var sb strings.Builder
	if p.lines > 0 {
		fmt.Fprintf(&sb, "\x1b[%dA", p.lines)
	}
	for _, b := range p.bars {
		sb.WriteString("\x1b[2K")
		sb.WriteString(b.line())
		sb.WriteByte('\n')
	}
	p.lines = len(p.bars)
	io.WriteString(p.out, sb.String())
}
