// Package wire writes node-mirror's HTTP answers the one way the whole daemon writes
// them: errors as the OCI distribution error envelope, and JSON bodies.
package wire

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
)

// Error is one entry of the OCI error envelope and the HTTP status it is sent with. It is
// an error, so handlers can return it like any other; Write sends it as it is and turns
// every other error into UNKNOWN without its text.
type Error struct {
	Status  int
	Code    string
	Message string
	// Header holds extra response headers (Retry-After, Allow). Shared by copies: set it
	// only through WithHeader.
	Header http.Header
}

func (e Error) Error() string { return e.Code + ": " + e.Message }

// Is matches on status and code, so a message changed with With still is the same error.
func (e Error) Is(target error) bool {
	t, ok := target.(Error)
	return ok && t.Status == e.Status && t.Code == e.Code
}

// With returns e with another message.
func (e Error) With(msg string) Error {
	e.Message = msg
	return e
}

// WithStatus returns e sent with another HTTP status.
func (e Error) WithStatus(status int) Error {
	e.Status = status
	return e
}

// WithHeader returns e with one more response header; e itself is unchanged.
func (e Error) WithHeader(key, value string) Error {
	h := e.Header.Clone()
	if h == nil {
		h = http.Header{}
	}
	h.Set(key, value)
	e.Header = h
	return e
}

// The codes the daemon sends, registered once with their status and default message.
// Codes are the distribution spec's; NOT_FOUND, UNAVAILABLE and UNKNOWN are the
// reference registry's for what the spec leaves open.
var (
	BlobUnknown     = Error{Status: http.StatusNotFound, Code: "BLOB_UNKNOWN", Message: "blob unknown to registry"}
	DigestInvalid   = Error{Status: http.StatusBadRequest, Code: "DIGEST_INVALID", Message: "provided digest did not match uploaded content"}
	ManifestInvalid = Error{Status: http.StatusBadRequest, Code: "MANIFEST_INVALID", Message: "manifest invalid"}
	ManifestUnknown = Error{Status: http.StatusNotFound, Code: "MANIFEST_UNKNOWN", Message: "manifest unknown"}
	NameInvalid     = Error{Status: http.StatusBadRequest, Code: "NAME_INVALID", Message: "invalid repository name"}
	NameUnknown     = Error{Status: http.StatusNotFound, Code: "NAME_UNKNOWN", Message: "repository name not known to registry"}
	TagInvalid      = Error{Status: http.StatusBadRequest, Code: "TAG_INVALID", Message: "manifest tag did not match URI"}
	Unauthorized    = Error{Status: http.StatusUnauthorized, Code: "UNAUTHORIZED", Message: "authentication required"}
	Denied          = Error{Status: http.StatusForbidden, Code: "DENIED", Message: "requested access to the resource is denied"}
	Unsupported     = Error{Status: http.StatusMethodNotAllowed, Code: "UNSUPPORTED", Message: "the operation is unsupported"}
	TooManyRequests = Error{Status: http.StatusTooManyRequests, Code: "TOOMANYREQUESTS", Message: "too many requests"}
	NotFound        = Error{Status: http.StatusNotFound, Code: "NOT_FOUND", Message: "no such endpoint"}
	Unavailable     = Error{Status: http.StatusServiceUnavailable, Code: "UNAVAILABLE", Message: "service unavailable"}
	Unknown         = Error{Status: http.StatusInternalServerError, Code: "UNKNOWN", Message: "unknown error"}
)

// Envelope is the OCI error body; clients decode it to say what went wrong.
type Envelope struct {
	Errors []Entry `json:"errors"`
}

// Entry is one error of an Envelope.
type Entry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// Write answers with err in the OCI error envelope. An error that is not an Error (or
// wraps none) is sent as UNKNOWN: its text is for the log, not for clients. HEAD answers
// carry headers only, as HTTP wants.
func Write(w http.ResponseWriter, r *http.Request, err error) {
	var e Error
	if !errors.As(err, &e) {
		e = Unknown
	}
	for k, v := range e.Header {
		w.Header()[k] = v
	}
	b, _ := json.Marshal(Envelope{Errors: []Entry{{Code: e.Code, Message: e.Message}}})
	send(w, r, e.Status, b)
}

// JSON answers with v as indented JSON.
func JSON(w http.ResponseWriter, r *http.Request, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		Write(w, r, Unknown.With("encoding the answer: "+err.Error()))
		return
	}
	send(w, r, status, append(b, '\n'))
}

func send(w http.ResponseWriter, r *http.Request, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		w.Write(body)
	}
}
