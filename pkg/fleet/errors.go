package fleet

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/node-mirror/node-mirror/internal/wire"
)

// Errors a ChunkSource or ManifestSource returns (wrapped as it likes) to choose the status
// a peer sees, and that Fetch and FetchManifest return (inside a *FetchError) for those
// statuses.
var (
	ErrNotFound        = errors.New("not found")         // 404: no such blob, or hop 1 and not here
	ErrUnavailable     = errors.New("unavailable")       // 503: upstream down or failing
	ErrTooManyRequests = errors.New("too many requests") // 429: upstream rate-limits us
	ErrUnauthorized    = errors.New("unauthorized")      // 401 from a peer: keys differ
)

// Reasons for a fallback to upstream, the values of node_mirror_peer_fallbacks_total's
// reason label and of FetchError.Reason.
const (
	FallbackDown    = "down"    // the owner could not be dialled
	FallbackTimeout = "timeout" // no headers, or no bytes, within the timeouts
	FallbackRefused = "refused" // the owner answered but declined: 401, 403, 429
	FallbackFault   = "fault"   // bytes from the owner failed verification (the mirror says so)
	FallbackError   = "error"   // anything else: 404, 5xx, a short or malformed response
)

var fallbackReasons = []string{FallbackDown, FallbackTimeout, FallbackRefused, FallbackFault, FallbackError}

// FetchError is every error Fetch, the bodies it returns, and FetchManifest report. Reason is one of the
// Fallback* values; errors.Is(err, ErrNotFound) and friends work through Unwrap.
type FetchError struct {
	Peer   string
	Reason string
	Status int // HTTP status when the peer answered, else 0
	Err    error
}

func (e *FetchError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("peer %s: status %d: %v", e.Peer, e.Status, e.Err)
	}
	return fmt.Sprintf("peer %s: %v", e.Peer, e.Err)
}

func (e *FetchError) Unwrap() error { return e.Err }

// FallbackReason is the fallback reason for an error from Fetch, its body or
// FetchManifest: err's Reason if it is a *FetchError, FallbackError otherwise.
func FallbackReason(err error) string {
	if fe, ok := errors.AsType[*FetchError](err); ok {
		return fe.Reason
	}
	return FallbackError
}

// The peer API's errors, in the daemon's one envelope (internal/wire).
var (
	errMethod     = wire.Unsupported.With("only GET and HEAD").WithHeader("Allow", "GET, HEAD")
	errBadRequest = wire.Error{Status: http.StatusBadRequest, Code: "BAD_REQUEST", Message: "invalid peer request"}
)

// toWire is the one place where a source's errors become statuses; unknown is the 404
// for the kind of content asked for.
func toWire(err error, unknown wire.Error) wire.Error {
	switch {
	case errors.Is(err, ErrNotFound):
		return unknown
	case errors.Is(err, ErrTooManyRequests):
		return wire.TooManyRequests.With("upstream registry is rate-limiting")
	default:
		return wire.Unavailable.With("content unavailable")
	}
}

// fromStatus is the inverse for the client: the sentinel for a peer's status.
func fromStatus(status int) (reason string, err error) {
	switch status {
	case http.StatusNotFound:
		return FallbackError, ErrNotFound
	case http.StatusServiceUnavailable:
		return FallbackError, ErrUnavailable
	case http.StatusTooManyRequests:
		return FallbackRefused, ErrTooManyRequests
	case http.StatusUnauthorized, http.StatusForbidden:
		return FallbackRefused, ErrUnauthorized
	}
	return FallbackError, fmt.Errorf("unexpected status")
}
