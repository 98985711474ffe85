package platformpick

import (
	"testing"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func desc(name string, p *ocispec.Platform) ocispec.Descriptor {
	return ocispec.Descriptor{Digest: digest.FromString(name), Platform: p}
}

func TestBest(t *testing.T) {
	arm7 := desc("arm7", &ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v7"})
	arm64 := desc("arm64", &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"})
	amd64 := desc("amd64", &ocispec.Platform{OS: "linux", Architecture: "amd64"})
	attestation := desc("attestation", nil)
	arm64Only := platforms.Only(ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"})
	for _, tc := range []struct {
		name string
		ds   []ocispec.Descriptor
		want string // "" for none
	}{
		{"the native image, whatever the order", []ocispec.Descriptor{attestation, arm7, amd64, arm64}, "arm64"},
		{"a compatible one when the native is missing", []ocispec.Descriptor{amd64, arm7}, "arm7"},
		{"none", []ocispec.Descriptor{amd64, attestation}, ""},
		{"empty", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := Best(arm64Only, tc.ds)
			if tc.want == "" {
				if ok {
					t.Fatalf("picked %s, want none", got.Digest)
				}
				return
			}
			if !ok || got.Digest != digest.FromString(tc.want) {
				t.Fatalf("picked %s (ok %v), want %s", got.Digest, ok, tc.want)
			}
		})
	}
}
