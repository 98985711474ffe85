// Package countwriter counts the body bytes of an HTTP response without hiding the
// underlying writer's ReadFrom, so files still go out by sendfile, nor its other methods
// (http.ResponseController reaches them through Unwrap).
package countwriter

import (
	"io"
	"net/http"
)

// Writer wraps an http.ResponseWriter and counts body bytes in N.
type Writer struct {
	http.ResponseWriter
	N int64
}

// New wraps w.
func New(w http.ResponseWriter) *Writer { return &Writer{ResponseWriter: w} }

func (c *Writer) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.N += int64(n)
	return n, err
}

// ReadFrom hands src to net/http's own ReadFrom, which uses sendfile for files.
func (c *Writer) ReadFrom(src io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := c.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(struct{ io.Writer }{c.ResponseWriter}, src)
	}
	c.N += n
	return n, err
}

// Unwrap lets http.ResponseController find the underlying writer.
func (c *Writer) Unwrap() http.ResponseWriter { return c.ResponseWriter }
