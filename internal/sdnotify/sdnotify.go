// Package sdnotify tells systemd about service state through $NOTIFY_SOCKET, per the
// documented sd_notify protocol: one datagram of newline-separated assignments.
package sdnotify

import (
	"fmt"
	"net"
	"os"
)

// Ready reports READY=1. Without $NOTIFY_SOCKET (not under systemd) it does nothing.
func Ready() error { return Notify("READY=1") }

// Stopping reports STOPPING=1.
func Stopping() error { return Notify("STOPPING=1") }

// Notify sends state to systemd.
func Notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // abstract namespace socket
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}
