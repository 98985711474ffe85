package fleet

import (
	"bytes"
	"context"
	"log/slog"
)

// mlLog turns the lines of a log.Logger (memberlist's "[LEVEL] memberlist: message", or
// net/http's server errors) into slog records, so they land in the daemon's log with
// levels a filter understands.
type mlLog struct {
	log       *slog.Logger
	component string
}

func (l mlLog) Write(p []byte) (int, error) {
	line := bytes.TrimSpace(p)
	level := slog.LevelInfo
	for _, lv := range []struct {
		tag   string
		level slog.Level
	}{
		{"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo},
		// Memberlist says ERR for what a fleet lives with (a member vanished mid
		// push/pull, a packet that did not decrypt): the daemon is not failing.
		{"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelWarn},
	} {
		if rest, ok := bytes.CutPrefix(line, []byte(lv.tag)); ok {
			level, line = lv.level, bytes.TrimSpace(rest)
			break
		}
	}
	line = bytes.TrimPrefix(line, []byte("memberlist: "))
	l.log.Log(context.Background(), level, string(line), "component", l.component)
	return len(p), nil
}
