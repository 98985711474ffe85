package mirror

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// wireError is one entry of the OCI distribution error envelope plus its HTTP status.
type wireError struct {
	status  int
	code    string
	message string
	header  http.Header
}

// The codes we send, registered once (status, code, message) as the spec lists them.
var (
	errNameInvalid      = wireError{status: http.StatusBadRequest, code: "NAME_INVALID", message: "invalid repository name"}
	errNameUnknown      = wireError{status: http.StatusNotFound, code: "NAME_UNKNOWN", message: "repository name not known to registry"}
	errDigestInvalid    = wireError{status: http.StatusBadRequest, code: "DIGEST_INVALID", message: "invalid digest: want <algorithm>:<hex> with sha256 or sha512"}
	errManifestUnknown  = wireError{status: http.StatusNotFound, code: "MANIFEST_UNKNOWN", message: "manifest unknown"}
	errManifestInvalid  = wireError{status: http.StatusBadGateway, code: "MANIFEST_INVALID", message: "manifest invalid"}
	errBlobUnknown      = wireError{status: http.StatusNotFound, code: "BLOB_UNKNOWN", message: "blob unknown to registry"}
	errUnsupported      = wireError{status: http.StatusMethodNotAllowed, code: "UNSUPPORTED", message: "the operation is unsupported: this is a read-only pull-through mirror"}
	errNotFound         = wireError{status: http.StatusNotFound, code: "NOT_FOUND", message: "no such endpoint"}
	errTooManyRequests  = wireError{status: http.StatusTooManyRequests, code: "TOOMANYREQUESTS", message: "upstream registry is rate-limiting"}
	errDenied           = wireError{status: http.StatusForbidden, code: "DENIED", message: "upstream registry denied access"}
	errUnavailable      = wireError{status: http.StatusServiceUnavailable, code: "UNAVAILABLE", message: "upstream registry unavailable and content not cached"}
	errUpstreamMismatch = wireError{status: http.StatusBadGateway, code: "DIGEST_INVALID", message: "upstream content does not match its digest"}
)

// Domain errors raised inside the mirror, mapped to wire errors in toWire.
var (
	errContentMismatch  = errors.New("upstream content does not match its digest")
	errManifestTooLarge = errors.New("manifest exceeds the size limit")
)

// toWire is the one place where domain errors become wire errors. kind says what was
// asked for, since "not found" reads differently for a blob and a manifest.
func toWire(err error, kind string) wireError {
	var se *upstream.StatusError
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
	case errors.Is(err, errManifestTooLarge):
		return errManifestInvalid.with("manifest exceeds the 4 MiB limit")
	case errors.As(err, &se):
		switch {
		case se.Status == http.StatusTooManyRequests:
			we := errTooManyRequests
			if se.RetryAfter > 0 {
				we.header = http.Header{"Retry-After": {strconv.Itoa(int(se.RetryAfter.Seconds()))}}
			}
			return we
		case se.Status == http.StatusUnauthorized || se.Status == http.StatusForbidden:
			return errDenied
		}
		return errUnavailable
	}
	return errUnavailable
}

func (e wireError) with(msg string) wireError {
	e.message = msg
	return e
}

type envelope struct {
	Errors []envelopeError `json:"errors"`
}

type envelopeError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// writeError writes the OCI error envelope. HEAD answers carry no body, per HTTP.
func writeError(w http.ResponseWriter, r *http.Request, e wireError) {
	for k, v := range e.header {
		w.Header()[k] = v
	}
	if e.status == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", "GET, HEAD")
	}
	b, _ := json.Marshal(envelope{Errors: []envelopeError{{Code: e.code, Message: e.message}}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(e.status)
	if r.Method != http.MethodHead {
		w.Write(b)
	}
}
