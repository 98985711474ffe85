package main

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/rand/v2"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"
)

// pushed is what the seeding put into the upstream registry.
type pushed struct {
	repo      string
	manifest  v1.Hash
	mediaType types.MediaType
	layers    []v1.Descriptor
}

// randomBytes is n bytes of seeded pseudo-random data: incompressible like a real gzipped
// layer, and different for every name so no two blobs share a digest.
func randomBytes(seedName string, n int64) []byte {
	h := fnv.New64a()
	h.Write([]byte(seedName))
	var seed [32]byte
	s := h.Sum64()
	for i := range seed {
		seed[i] = byte(s >> (8 * (i % 8)))
		if i%8 == 7 {
			s = s*6364136223846793005 + 1442695040888963407
		}
	}
	b := make([]byte, n)
	rand.NewChaCha8(seed).Read(b)
	return b
}

// makeImage builds an OCI image with one layer per size. The layers are raw random bytes
// with the uncompressed-tar media type: registries and `ctr content fetch` never look
// inside, and generating real gzip streams would make seeding take minutes.
func makeImage(repo string, sizes []int64) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var layers []v1.Layer
	for i, n := range sizes {
		layers = append(layers, static.NewLayer(randomBytes(fmt.Sprintf("%s#%d", repo, i), n), types.OCIUncompressedLayer))
	}
	return mutate.AppendLayers(img, layers...)
}

// pushImage writes the image as repo:latest to the registry at host (plain HTTP).
func pushImage(ctx context.Context, host, repo string, img v1.Image) (pushed, error) {
	ref, err := name.ParseReference(host+"/"+repo+":latest", name.Insecure)
	if err != nil {
		return pushed{}, err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return pushed{}, fmt.Errorf("pushing %s: %w", ref, err)
	}
	m, err := img.Manifest()
	if err != nil {
		return pushed{}, err
	}
	dg, err := img.Digest()
	if err != nil {
		return pushed{}, err
	}
	mt, err := img.MediaType()
	if err != nil {
		return pushed{}, err
	}
	return pushed{repo: repo, manifest: dg, mediaType: mt, layers: m.Layers}, nil
}

type seedJob struct {
	repo  string
	sizes []int64
	out   *pushed
}

// seedAll generates and pushes the jobs, two at a time (generation and hashing are CPU
// bound and this is a two-core machine).
func seedAll(ctx context.Context, host string, jobs []seedJob) error {
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(2)
	for _, j := range jobs {
		g.Go(func() error {
			img, err := makeImage(j.repo, j.sizes)
			if err != nil {
				return err
			}
			p, err := pushImage(ctx, host, j.repo, img)
			if err != nil {
				return err
			}
			*j.out = p
			return nil
		})
	}
	return g.Wait()
}

// pullSizes splits total into n layer sizes shaped like a real image: a large base layer,
// a few mid-sized ones and small ones on top.
func pullSizes(total int64, n int) []int64 {
	weights := make([]float64, n)
	var sum float64
	for i := range weights {
		weights[i] = 1 / float64(int64(1)<<min(i, 6)) // 1, 1/2, 1/4, ...
		sum += weights[i]
	}
	sizes := make([]int64, n)
	var used int64
	for i := range sizes {
		sizes[i] = max(int64(float64(total)*weights[i]/sum), 4096)
		used += sizes[i]
	}
	sizes[0] += max(total-used, 0)
	return sizes
}
