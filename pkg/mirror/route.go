package mirror

import (
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/regname"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// How a request named its registry.
const (
	viaNS     = "ns"
	viaPrefix = "prefix"
)

const (
	kindManifests = "manifests"
	kindBlobs     = "blobs"
	kindTags      = "tags"
	kindReferrers = "referrers"
)

// route is a parsed /v2/ request: which registry, which repository, what is asked for.
type route struct {
	registry string
	repo     string // normalised: docker.io names carry library/
	kind     string
	ref      string        // tag, digest string, or "list"
	digest   digest.Digest // set when ref is a digest
	// via is how the request named the registry: viaNS, viaPrefix, or "" for the default.
	// Links the mirror hands back (pagination) must name it the same way.
	via string

	// Taken from the configuration when the request arrived, so a reload never changes
	// what an in-flight request talks to.
	client *upstream.Client
	policy *policy
}

var tagRe = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)

// parseRoute resolves a /v2/<name>/<kind>/<ref> request. isRegistry says whether a host
// is configured; def is the registry for requests that name none ("" for none).
//
// The registry is, in order: the ns query parameter (containerd), the first path element
// when it names a configured registry (containers/image mirrors with a path), or def
// (Docker's registry-mirrors). Nothing else is ever contacted.
func parseRoute(r *http.Request, isRegistry func(string) bool, def string) (route, error) {
	// Valid names and references never need escaping; an escaped byte is at best a
	// confused client and at worst an encoded slash or dot-dot trying to get past us.
	if strings.Contains(r.URL.EscapedPath(), "%") || r.URL.RawPath != "" {
		return route{}, errNameInvalid
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	if !ok {
		return route{}, errNotFound
	}
	segs := strings.Split(rest, "/")
	if len(segs) < 3 {
		return route{}, errNotFound
	}
	rt := route{kind: segs[len(segs)-2], ref: segs[len(segs)-1]}
	nameSegs := segs[:len(segs)-2]
	switch rt.kind {
	case kindManifests, kindBlobs, kindReferrers:
	case kindTags:
		if rt.ref != "list" {
			return route{}, errNotFound
		}
	default:
		// blobs/uploads/... is the push API.
		if slices.Contains(segs, "uploads") {
			return route{}, errUnsupported
		}
		return route{}, errNotFound
	}

	ns := r.URL.Query().Get("ns")
	switch {
	case ns != "":
		if !isRegistry(ns) {
			return route{}, errRegistryUnknown(ns)
		}
		rt.registry, rt.via = ns, viaNS
	case len(nameSegs) > 1 && isRegistry(nameSegs[0]):
		rt.registry, rt.via = nameSegs[0], viaPrefix
		nameSegs = nameSegs[1:]
	case def != "":
		rt.registry = def
	default:
		return route{}, errNameUnknown
	}
	rt.repo = strings.Join(nameSegs, "/")
	if rt.registry == "docker.io" && len(nameSegs) == 1 {
		rt.repo = "library/" + rt.repo
	}
	if regname.CheckRepo(rt.repo) != nil {
		return route{}, errNameInvalid
	}

	switch rt.kind {
	case kindBlobs, kindReferrers:
		d, err := digest.Parse(rt.ref)
		if err != nil || !d.Algorithm().Available() {
			return route{}, errDigestInvalid
		}
		rt.digest = d
	case kindManifests:
		if strings.Contains(rt.ref, ":") {
			d, err := digest.Parse(rt.ref)
			if err != nil || !d.Algorithm().Available() {
				return route{}, errDigestInvalid
			}
			rt.digest = d
		} else if !tagRe.MatchString(rt.ref) {
			// Only pulls come here, and a reference that cannot be a tag names no manifest:
			// "manifest unknown", as the reference registry and the 2023 conformance
			// suite have it.
			return route{}, errManifestUnknown.With("manifest unknown: " + strconv.Quote(rt.ref) + " is not a valid tag or digest")
		}
	}
	return rt, nil
}

func errRegistryUnknown(ns string) error {
	return errNameUnknown.With("registry " + ns + " is not mirrored here")
}
