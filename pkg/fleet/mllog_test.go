package fleet

import (
	"bytes"
	"log"
	"log/slog"
	"strings"
	"testing"
)

func TestMemberlistLogLevels(t *testing.T) {
	for _, tt := range []struct{ line, want string }{
		{"[DEBUG] memberlist: Stream connection from=127.0.0.1:1", "level=DEBUG msg=\"Stream connection from=127.0.0.1:1\""},
		{"[INFO] memberlist: Marking x as failed", "level=INFO msg=\"Marking x as failed\""},
		{"[WARN] memberlist: Refuting a suspect message", "level=WARN msg=\"Refuting a suspect message\""},
		{"[ERR] memberlist: Failed to receive", "level=WARN msg=\"Failed to receive\""},
		{"http: TLS handshake error", "level=INFO msg=\"http: TLS handshake error\""},
	} {
		var buf bytes.Buffer
		l := log.New(mlLog{slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), "memberlist"}, "", 0)
		l.Print(tt.line)
		if got := buf.String(); !strings.Contains(got, tt.want) || !strings.Contains(got, "component=memberlist") {
			t.Errorf("%q logged as %q, want %q", tt.line, got, tt.want)
		}
	}
}
