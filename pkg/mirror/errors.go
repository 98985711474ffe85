package mirror

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// The wire errors the mirror sends: the registered codes with what they mean here.
var (
	errNameInvalid      = wire.NameInvalid
	errNameUnknown      = wire.NameUnknown
	errDigestInvalid    = wire.DigestInvalid.With("invalid digest: want <algorithm>:<hex> with sha256 or sha512")
	errManifestUnknown  = wire.ManifestUnknown
	errManifestInvalid  = wire.ManifestInvalid.WithStatus(http.StatusBadGateway)
	errBlobUnknown      = wire.BlobUnknown
	errUnsupported      = wire.Unsupported.With("the operation is unsupported: this is a read-only pull-through mirror").WithHeader("Allow", "GET, HEAD")
	errNotFound         = wire.NotFound
	errTooManyRequests  = wire.TooManyRequests.With("upstream registry is rate-limiting")
	errDenied           = wire.Denied.With("upstream registry denied access")
	errUnavailable      = wire.Unavailable.With("upstream registry unavailable and content not cached")
	errUpstreamMismatch = wire.DigestInvalid.WithStatus(http.StatusBadGateway).With("upstream content does not match its digest")
)

// Domain errors raised inside the mirror, mapped to wire errors in toWire.
var (
	errContentMismatch  = errors.New("upstream content does not match its digest")
	errManifestTooLarge = errors.New("manifest exceeds the size limit")
)

// manifestTooLarge says which limit a manifest broke; the limit is configurable, so the
// message must not guess it.
type manifestTooLarge struct{ limit int64 }

func (e manifestTooLarge) Error() string {
	return fmt.Sprintf("manifest exceeds the size limit of %d bytes (max_manifest_size)", e.limit)
}

func (e manifestTooLarge) Is(target error) bool { return target == errManifestTooLarge }

// toWire is the one place where domain errors become wire errors. kind says what was
// asked for, since "not found" reads differently for a blob and a manifest.
func toWire(err error, kind string) wire.Error {
	var se *upstream.StatusError
	var tooLarge manifestTooLarge
	switch {
	case errors.Is(err, upstream.ErrNotFound), errors.Is(err, contentstore.ErrNotFound):
		switch kind {
		case kindBlobs:
			return errBlobUnknown
		case kindManifests, kindReferrers:
			return errManifestUnknown
		default:
			return errNameUnknown
		}
	case errors.Is(err, errContentMismatch):
		return errUpstreamMismatch
	case errors.As(err, &tooLarge):
		return errManifestInvalid.With(tooLarge.Error())
	case errors.Is(err, errManifestTooLarge):
		return errManifestInvalid.With(errManifestTooLarge.Error())
	case errors.As(err, &se):
		switch {
		case se.Status == http.StatusTooManyRequests:
			we := errTooManyRequests
			if se.RetryAfter > 0 {
				we = we.WithHeader("Retry-After", strconv.Itoa(int(se.RetryAfter.Seconds())))
			}
			return we
		case se.Status == http.StatusUnauthorized || se.Status == http.StatusForbidden:
			return errDenied
		}
		return errUnavailable
	}
	return errUnavailable
}
