package server

import (
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/node-mirror/node-mirror/internal/wire"
)

// loopbackListen reports whether listen (host:port) binds loopback only: a loopback
// address, or localhost. Other names count as not loopback, *.localhost included: what
// they resolve to can change, and Go's resolver asks /etc/hosts and DNS for them.
func loopbackListen(listen string) (bool, error) {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false, err
	}
	if strings.EqualFold(host, "localhost") {
		return true, nil
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback(), nil
}

// isLoopbackName tells whether a request's Host names this machine. Browsers pin
// *.localhost to loopback (RFC 6761), so a page cannot rebind those names.
func isLoopbackName(host string) bool {
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true // RFC 6761: these never leave the machine, and browsers know it
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// hostGuard defends a loopback listener against DNS rebinding: a web page from
// attacker.example whose name the attacker then points at 127.0.0.1 makes the browser
// send its requests here, with "Host: attacker.example", and lets the page read the
// answers, which are whatever the mirror's credentials can pull. A request on a loopback
// listener must therefore name the mirror by a loopback name or address; a request
// without Host (HTTP/1.0) comes from no browser.
//
// On a listener beyond loopback there is no check: such a listener needs client
// authentication (CheckExposure), which a rebinding page does not have, or the operator
// chose --insecure-public-listen, which lets everyone on the network in anyway.
func (s *Server) hostGuard(listen string, next http.Handler) http.Handler {
	if loopback, err := loopbackListen(listen); err != nil || !loopback {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hostAllowed(r.Host) {
			s.log.Warn("refused a request naming another host on the loopback listener (DNS rebinding?)",
				"host", r.Host, "remote", r.RemoteAddr, "path", r.URL.Path)
			wire.Write(w, r, wire.Denied.WithStatus(http.StatusMisdirectedRequest).With(
				"this mirror answers only requests addressed to a loopback name or address"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func hostAllowed(host string) bool {
	if host == "" {
		return true
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	return isLoopbackName(host)
}
