// Package config loads and validates node-mirror's TOML configuration.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// DefaultRegistries are mirrored when neither the config file nor flags name any.
var DefaultRegistries = []string{
	"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io", "mcr.microsoft.com", "public.ecr.aws",
}

// Config is the whole daemon configuration.
type Config struct {
	Listen  string `toml:"listen"`
	DataDir string `toml:"data_dir"`
	// DefaultRegistry serves requests that name no registry (Docker's classic registry-mirrors).
	DefaultRegistry string     `toml:"default_registry"`
	Cache           Cache      `toml:"cache"`
	Registries      []Registry `toml:"registry"`
	// Fleet makes this node one of a cluster's mirrors; off unless peer_listen is set.
	Fleet Fleet `toml:"fleet"`
}

// Fleet is the cluster this node shares its cache with (docs/fleet.md).
type Fleet struct {
	// NodeName is this member's name, unique in the fleet; default: the host name.
	NodeName string `toml:"node_name"`
	// PeerListen is where the peer API listens (members only, every request signed);
	// setting it turns fleet mode on.
	PeerListen string `toml:"peer_listen"`
	// PeerAdvertise is the peer API address the others dial; default: PeerListen.
	PeerAdvertise string `toml:"peer_advertise"`
	// GossipListen is where memberlist listens, TCP and UDP.
	GossipListen string `toml:"gossip_listen"`
	// Join lists gossip addresses or DNS names of members, retried until one answers.
	Join []string `toml:"join"`
	// KeyFile holds the fleet key: 64 hex digits, readable by the daemon only.
	KeyFile string `toml:"key_file"`
	// PeerTLSCert and PeerTLSKey serve the peer API over TLS; PeerTLSCA is what members
	// trust (empty: the system roots).
	PeerTLSCert string `toml:"peer_tls_cert"`
	PeerTLSKey  string `toml:"peer_tls_key"`
	PeerTLSCA   string `toml:"peer_tls_ca"`
}

// Enabled reports whether fleet mode is configured.
func (f Fleet) Enabled() bool { return f.PeerListen != "" }

// Cache is the cache policy.
type Cache struct {
	// TagFreshness is how long a tag's cached digest is served without asking upstream.
	// Zero revalidates every tag request with a HEAD.
	TagFreshness Duration `toml:"tag_freshness"`
	// ListTTL bounds how long tag lists and referrers answers are reused; positive.
	ListTTL Duration `toml:"list_ttl"`
	// MaxManifestSize refuses larger manifests; 4 MiB is what registries accept.
	MaxManifestSize int64 `toml:"max_manifest_size"`
	// MaxSize bounds the cache ("20GiB", or "10%" of the data dir's filesystem); least
	// recently used content is evicted beyond it. Empty: no bound.
	MaxSize Size `toml:"max_size"`
	// MinFree keeps this much of the filesystem free ("5GiB" or "10%"); the cache evicts,
	// then passes content through uncached, rather than fill the disk.
	MinFree Size `toml:"min_free"`
	// OrphanGrace is how long a download interrupted by a crash is kept to be resumed;
	// positive.
	OrphanGrace Duration `toml:"orphan_grace"`
	// EagerFetch is how many layers of a requested image are fetched ahead of the engine
	// at once; 0 turns it off.
	EagerFetch int `toml:"eager_fetch"`
	// FetchConcurrency is how many connections fetch one cold blob when its upstream
	// answers ranges; 1 fetches every blob as one stream.
	FetchConcurrency int `toml:"fetch_concurrency"`
	// FetchChunkSize is the size of those ranges ("16MiB"); blobs under two chunks are one
	// request. In a fleet it is also the unit of ownership: the same on every member.
	FetchChunkSize Size `toml:"fetch_chunk_size"`
	// UpstreamConnections caps, per registry, the connections ranged fetches add beyond
	// each blob's first.
	UpstreamConnections int `toml:"upstream_connections"`
}

// Size is a byte count ("20GiB", "512MB", "1000") or a percentage of the data dir's
// filesystem ("10%"). The zero value means unset.
type Size struct {
	Bytes   int64
	Percent float64
}

// IsZero reports an unset size.
func (s Size) IsZero() bool { return s.Bytes == 0 && s.Percent == 0 }

// String writes s so that ParseSize reads it back exactly: in the largest binary unit
// that divides it, else in bytes.
func (s Size) String() string {
	if s.Percent > 0 {
		return strconv.FormatFloat(s.Percent, 'f', -1, 64) + "%"
	}
	for _, u := range []struct {
		suffix string
		n      int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if s.Bytes != 0 && s.Bytes%u.n == 0 {
			return strconv.FormatInt(s.Bytes/u.n, 10) + u.suffix
		}
	}
	return strconv.FormatInt(s.Bytes, 10)
}

var sizeUnits = []struct {
	suffix string
	mult   float64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
}

// ParseSize reads a Size.
func ParseSize(v string) (Size, error) {
	v = strings.TrimSpace(v)
	if p, ok := strings.CutSuffix(v, "%"); ok {
		f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || f <= 0 || f > 100 {
			return Size{}, fmt.Errorf("size %q: want a percentage in (0, 100]", v)
		}
		return Size{Percent: f}, nil
	}
	mult := 1.0
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			v, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 {
		return Size{}, fmt.Errorf("size %q: want bytes such as 20GiB, 512MB or 1000, or a percentage such as 10%%", v)
	}
	return Size{Bytes: int64(f * mult)}, nil
}

// UnmarshalText parses a Size.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// MarshalText writes a Size.
func (s Size) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Registry is one upstream registry as clients name it, and where to reach it.
type Registry struct {
	Name string `toml:"name"`
	// Endpoints are tried in order, so a corporate mirror can sit in front of the real registry.
	Endpoints []string `toml:"endpoints"`
	// Username and Password belong to the registry's own endpoint (registry-1.docker.io
	// for docker.io, the registry's name otherwise, or the only endpoint) and to no other.
	Username string `toml:"username"`
	Password string `toml:"password"`
	// PasswordFile keeps secrets out of the config file itself.
	PasswordFile string `toml:"password_file"`
	// EndpointCredentials give other endpoints, such as a corporate mirror, their own.
	EndpointCredentials []EndpointCredentials `toml:"endpoint_credentials"`
	// TrustedHosts (host[:port], port 443 when absent) may be reached by this registry's
	// redirects and token realms at private addresses too: an on-premises registry whose
	// token server or storage is another private host. https only, as for any other host.
	TrustedHosts []string `toml:"trusted_hosts"`
}

// EndpointCredentials are the credentials of one endpoint of a registry.
type EndpointCredentials struct {
	// Host is the endpoint's host[:port] as in its URL.
	Host         string `toml:"host"`
	Username     string `toml:"username"`
	Password     string `toml:"password"`
	PasswordFile string `toml:"password_file"`
}

// Duration is a time.Duration written as "30s" in TOML.
type Duration struct{ time.Duration }

// UnmarshalText parses Go duration syntax.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText writes Go duration syntax.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Default returns the configuration `make run` uses.
func Default() Config {
	c := Config{
		Listen:          "127.0.0.1:5000",
		DataDir:         "/var/lib/node-mirror",
		DefaultRegistry: "docker.io",
		Cache: Cache{
			TagFreshness:    Duration{10 * time.Second},
			ListTTL:         Duration{30 * time.Second},
			MaxManifestSize: 4 << 20,
			OrphanGrace:     Duration{time.Hour},
			EagerFetch:      4,
			// From the sweep in docs/BENCHMARKS.md.
			FetchConcurrency:    4,
			FetchChunkSize:      Size{Bytes: 16 << 20},
			UpstreamConnections: 16,
		},
	}
	for _, name := range DefaultRegistries {
		c.Registries = append(c.Registries, Registry{Name: name})
	}
	return c
}

// Load reads a TOML file over the defaults: a key the file sets has the file's value,
// zero included ("0s" is a duration like any other), and a key it leaves out keeps its
// default. Unknown keys are errors, so typos do not silently fall back to defaults.
func Load(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Default(), fmt.Errorf("reading config: %w", err)
	}
	c := Default()
	// The file's registries replace the default list as a whole; decoding into the
	// defaults' entries would mix the two.
	defaultRegistries := c.Registries
	c.Registries = nil
	dec := toml.NewDecoder(strings.NewReader(string(b))).DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		c = Default()
		var sme *toml.StrictMissingError
		if errors.As(err, &sme) && len(sme.Errors) > 0 {
			de := sme.Errors[0]
			row, col := de.Position()
			return c, fmt.Errorf("%s:%d:%d: unknown key %q", path, row, col, strings.Join(de.Key(), "."))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return c, fmt.Errorf("%s:%d:%d: %s", path, row, col, de.Error())
		}
		return c, fmt.Errorf("%s: %w", path, err)
	}
	if c.Registries == nil {
		c.Registries = defaultRegistries
	}
	return c, nil
}

// SetUpstreams replaces the registry list with NAME=URL pairs from the command line.
// Several pairs with one NAME give that registry several endpoints, in order.
func (c *Config) SetUpstreams(pairs []string) error {
	var regs []Registry
	idx := map[string]int{}
	for _, p := range pairs {
		name, u, ok := strings.Cut(p, "=")
		if !ok || name == "" || u == "" {
			return fmt.Errorf("--upstream %q: want NAME=URL, e.g. docker.io=https://registry-1.docker.io", p)
		}
		if err := regname.Check(name); err != nil {
			return fmt.Errorf("--upstream %q: %w", p, err)
		}
		i, seen := idx[name]
		if !seen {
			i = len(regs)
			idx[name] = i
			regs = append(regs, Registry{Name: name})
		}
		regs[i].Endpoints = append(regs[i].Endpoints, u)
	}
	c.Registries = regs
	return nil
}

// Validate checks the configuration and fills in endpoints for well-known registries.
func (c *Config) Validate() error {
	if c.Listen == "" {
		return errors.New("listen address is empty")
	}
	if c.DataDir == "" {
		return errors.New("data dir is empty")
	}
	if len(c.Registries) == 0 {
		return errors.New("no registries configured")
	}
	if c.Cache.MaxManifestSize <= 0 {
		return errors.New("cache.max_manifest_size must be positive")
	}
	if c.Cache.TagFreshness.Duration < 0 {
		return errors.New("cache.tag_freshness must be 0 (revalidate every request) or more")
	}
	if c.Cache.ListTTL.Duration <= 0 {
		return errors.New("cache.list_ttl must be positive")
	}
	if c.Cache.OrphanGrace.Duration <= 0 {
		return errors.New("cache.orphan_grace must be positive")
	}
	if c.Cache.EagerFetch < 0 {
		return errors.New("cache.eager_fetch must be 0 (off) or more")
	}
	if c.Cache.FetchConcurrency < 1 || c.Cache.FetchConcurrency > 64 {
		return errors.New("cache.fetch_concurrency must be 1 (one stream per blob) to 64")
	}
	if cs := c.Cache.FetchChunkSize; cs.Percent != 0 || cs.Bytes < 64<<10 || cs.Bytes > MaxFetchChunkSize {
		return fmt.Errorf("cache.fetch_chunk_size must be a size from 64KiB to %s", FormatSize(MaxFetchChunkSize))
	}
	if c.Cache.UpstreamConnections < 1 {
		return errors.New("cache.upstream_connections must be 1 or more")
	}
	if err := c.Fleet.validate(); err != nil {
		return err
	}
	seen := map[string]bool{}
	for i := range c.Registries {
		r := &c.Registries[i]
		if r.Name == "" {
			return errors.New("registry with empty name")
		}
		if err := regname.Check(r.Name); err != nil {
			return err
		}
		if seen[r.Name] {
			return fmt.Errorf("registry %q configured twice", r.Name)
		}
		seen[r.Name] = true
		if len(r.Endpoints) == 0 {
			r.Endpoints = []string{DefaultEndpoint(r.Name)}
		}
		for _, e := range r.Endpoints {
			u, err := url.Parse(e)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return fmt.Errorf("registry %q: endpoint %q is not an http(s) URL", r.Name, e)
			}
		}
		if r.PasswordFile != "" {
			b, err := os.ReadFile(r.PasswordFile)
			if err != nil {
				return fmt.Errorf("registry %q: %w", r.Name, err)
			}
			r.Password = strings.TrimSpace(string(b))
		}
		if err := r.validateEndpointCredentials(); err != nil {
			return fmt.Errorf("registry %q: %w", r.Name, err)
		}
		for _, h := range r.TrustedHosts {
			if err := regname.Check(h); err != nil {
				return fmt.Errorf("registry %q: trusted_hosts: %w", r.Name, err)
			}
		}
	}
	if c.DefaultRegistry != "" {
		if err := regname.Check(c.DefaultRegistry); err != nil {
			return fmt.Errorf("default_registry: %w", err)
		}
	}
	if c.DefaultRegistry != "" && !seen[c.DefaultRegistry] {
		// Requests without a registry can only go to a configured one; fall back to none.
		c.DefaultRegistry = ""
	}
	return nil
}

func (r *Registry) validateEndpointCredentials() error {
	seen := map[string]bool{}
	for i := range r.EndpointCredentials {
		ec := &r.EndpointCredentials[i]
		key := endpointHostKey(r.Endpoints, ec.Host)
		switch {
		case ec.Host == "":
			return errors.New("endpoint_credentials without host")
		case key == "":
			return fmt.Errorf("endpoint_credentials host %q is not the host[:port] of any of its endpoints %v", ec.Host, r.Endpoints)
		case seen[key]:
			return fmt.Errorf("endpoint_credentials host %q given twice", ec.Host)
		}
		seen[key] = true
		if ec.PasswordFile != "" {
			b, err := os.ReadFile(ec.PasswordFile)
			if err != nil {
				return fmt.Errorf("endpoint_credentials host %q: %w", ec.Host, err)
			}
			ec.Password = strings.TrimSpace(string(b))
		}
		if ec.Username == "" && ec.Password == "" {
			return fmt.Errorf("endpoint_credentials host %q: no username or password", ec.Host)
		}
	}
	return nil
}

// endpointHostKey is host:port, lower case with the default port filled in, of the
// endpoint among endpoints that host[:port] names; "" if it names none.
func endpointHostKey(endpoints []string, host string) string {
	for _, e := range endpoints {
		u, err := url.Parse(e)
		if err != nil {
			continue
		}
		h, err := url.Parse(u.Scheme + "://" + host)
		if err != nil || h.Host != host {
			return ""
		}
		if k := hostKey(h); k == hostKey(u) {
			return k
		}
	}
	return ""
}

func hostKey(u *url.URL) string {
	p := u.Port()
	if p == "" {
		p = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return net.JoinHostPort(strings.ToLower(u.Hostname()), p)
}

// MaxFetchChunkSize bounds fetch_chunk_size: a chunk is what one member may ask another
// to fetch and hold, and the peer API refuses larger ones.
const MaxFetchChunkSize = 64 << 20

// FormatSize writes a byte count as ParseSize reads it.
func FormatSize(n int64) string { return Size{Bytes: n}.String() }

func (f Fleet) validate() error {
	if !f.Enabled() {
		if f.GossipListen != "" || len(f.Join) > 0 || f.KeyFile != "" || f.PeerAdvertise != "" {
			return errors.New("fleet: peer_listen is not set, so the other fleet keys do nothing; set it, or remove them")
		}
		return nil
	}
	for key, v := range map[string]string{"peer_listen": f.PeerListen, "gossip_listen": f.GossipListen} {
		if _, _, err := net.SplitHostPort(v); err != nil {
			return fmt.Errorf("fleet.%s %q: want host:port: %w", key, v, err)
		}
	}
	if f.PeerAdvertise != "" {
		if _, _, err := net.SplitHostPort(f.PeerAdvertise); err != nil {
			return fmt.Errorf("fleet.peer_advertise %q: want host:port: %w", f.PeerAdvertise, err)
		}
	}
	if f.KeyFile == "" {
		return errors.New("fleet: key_file is required with peer_listen: every peer request is signed with the fleet key")
	}
	if (f.PeerTLSCert == "") != (f.PeerTLSKey == "") {
		return errors.New("fleet: peer_tls_cert and peer_tls_key go together")
	}
	return nil
}

// DefaultEndpoint is where a registry's API lives when the config names none.
func DefaultEndpoint(name string) string {
	if name == "docker.io" {
		return "https://registry-1.docker.io"
	}
	return "https://" + name
}
