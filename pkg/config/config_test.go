package config

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoad(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(secret, []byte("hunter2\n"), 0o600)
	p := write(t, `
listen = "127.0.0.1:5001"
data_dir = "/srv/mirror"

[cache]
tag_freshness = "1m"

[[registry]]
name = "docker.io"
endpoints = ["https://mirror.corp.example", "https://registry-1.docker.io"]
username = "me"
password_file = "`+secret+`"

[[registry]]
name = "ghcr.io"
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:5001" || c.DataDir != "/srv/mirror" || c.Cache.TagFreshness.Duration != time.Minute {
		t.Fatalf("scalars not loaded: %+v", c)
	}
	if c.Cache.MaxManifestSize != 4<<20 || c.Cache.ListTTL.Duration != 30*time.Second {
		t.Fatalf("defaults lost: %+v", c.Cache)
	}
	if len(c.Registries) != 2 || c.Registries[0].Endpoints[0] != "https://mirror.corp.example" || c.Registries[0].Password != "hunter2" {
		t.Fatalf("docker.io: %+v", c.Registries[0])
	}
	if c.Registries[1].Endpoints[0] != "https://ghcr.io" {
		t.Fatalf("ghcr.io default endpoint: %v", c.Registries[1].Endpoints)
	}
}

func TestEndpointCredentials(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "corp")
	os.WriteFile(secret, []byte("corp-pw\n"), 0o600)
	p := write(t, `
[[registry]]
name = "docker.io"
endpoints = ["https://mirror.corp.example", "http://10.0.0.5:5000", "https://registry-1.docker.io"]
username = "hub"
password = "hub-pw"

[[registry.endpoint_credentials]]
host = "mirror.corp.example"
username = "corp"
password_file = "`+secret+`"

[[registry.endpoint_credentials]]
host = "10.0.0.5:5000"
password = "refresh-token"
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	got := c.Registries[0].EndpointCredentials
	want := []EndpointCredentials{
		{Host: "mirror.corp.example", Username: "corp", Password: "corp-pw", PasswordFile: secret},
		{Host: "10.0.0.5:5000", Password: "refresh-token"},
	}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("endpoint credentials %+v, want %+v", got, want)
	}
	if r := c.Registries[0]; r.Username != "hub" || r.Password != "hub-pw" {
		t.Fatalf("registry credentials: %+v", r)
	}

	// A misspelt key inside the table is named with its line.
	_, err = Load(write(t, "[[registry]]\nname = \"a.io\"\n[[registry.endpoint_credentials]]\nhots = \"a.io\"\n"))
	if err == nil || !strings.Contains(err.Error(), "config.toml:4") || !strings.Contains(err.Error(), "registry.endpoint_credentials.hots") {
		t.Fatalf("misspelt key: %v", err)
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"syntax", "listen = \n", "config.toml:1"},
		{"unknown key", "lisen = \"x\"\n", "lisen"},
		{"bad duration", "[cache]\ntag_freshness = \"soon\"\n", "config.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(write(t, tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"defaults", func(*Config) {}, ""},
		{"no registries", func(c *Config) { c.Registries = nil }, "no registries"},
		{"duplicate", func(c *Config) { c.Registries = append(c.Registries, Registry{Name: "docker.io"}) }, "twice"},
		{"bad name", func(c *Config) { c.Registries = []Registry{{Name: "a/b"}} }, `registry "a/b"`},
		{"bad endpoint", func(c *Config) { c.Registries = []Registry{{Name: "a.io", Endpoints: []string{"ftp://a"}}} }, "not an http"},
		{"host with port", func(c *Config) { c.Registries = []Registry{{Name: "localhost:5000"}} }, ""},
		{"endpoint credentials for another host", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "evil.example", Username: "u", Password: "p"}}}}
		}, `endpoint_credentials host "evil.example" is not`},
		{"endpoint credentials on the wrong port", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "a.io:80", Username: "u", Password: "p"}}}}
		}, `endpoint_credentials host "a.io:80" is not`},
		{"endpoint credentials with a path", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "a.io/x", Username: "u", Password: "p"}}}}
		}, `endpoint_credentials host "a.io/x" is not`},
		{"endpoint credentials, default port spelt out", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "A.io:443", Username: "u", Password: "p"}}}}
		}, ""},
		{"endpoint credentials twice", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "a.io", Password: "p"}, {Host: "a.io:443", Password: "q"}}}}
		}, "given twice"},
		{"endpoint credentials without host", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Username: "u", Password: "p"}}}}
		}, "without host"},
		{"endpoint credentials without secret", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "a.io"}}}}
		}, "no username or password"},
		{"trusted hosts", func(c *Config) {
			c.Registries = []Registry{{Name: "registry.gitlab.corp", TrustedHosts: []string{"gitlab.corp", "10.0.0.7:8443"}}}
		}, ""},
		{"trusted host with a scheme", func(c *Config) {
			c.Registries = []Registry{{Name: "registry.gitlab.corp", TrustedHosts: []string{"https://gitlab.corp"}}}
		}, `trusted_hosts: registry "https://gitlab.corp"`},
		{"trusted host with a path", func(c *Config) {
			c.Registries = []Registry{{Name: "registry.gitlab.corp", TrustedHosts: []string{"gitlab.corp/jwt/auth"}}}
		}, `trusted_hosts`},
		{"endpoint credentials, missing password file", func(c *Config) {
			c.Registries = []Registry{{Name: "a.io", EndpointCredentials: []EndpointCredentials{{Host: "a.io", PasswordFile: "/nonexistent/pw"}}}}
		}, "/nonexistent/pw"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.mod(&c)
			err := c.Validate()
			if (tc.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestSetUpstreams(t *testing.T) {
	c := Default()
	if err := c.SetUpstreams([]string{"docker.io=http://127.0.0.1:1", "docker.io=http://127.0.0.1:2", "quay.io=http://127.0.0.1:3"}); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.Registries) != 2 || len(c.Registries[0].Endpoints) != 2 || c.Registries[1].Name != "quay.io" {
		t.Fatalf("%+v", c.Registries)
	}
	for _, bad := range []string{"docker.io", "=http://x", "docker.io="} {
		if err := c.SetUpstreams([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	// Without docker.io configured, requests naming no registry have nowhere to go.
	c.SetUpstreams([]string{"quay.io=http://127.0.0.1:3"})
	c.Validate()
	if c.DefaultRegistry != "" {
		t.Fatalf("default registry %q is not configured", c.DefaultRegistry)
	}
}

func TestCacheBudget(t *testing.T) {
	p := write(t, `
[cache]
max_size = "20GiB"
min_free = "10%"
orphan_grace = "30m"
eager_fetch = 0
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.Cache.MaxSize != (Size{Bytes: 20 << 30}) || c.Cache.MinFree != (Size{Percent: 10}) ||
		c.Cache.OrphanGrace.Duration != 30*time.Minute || c.Cache.EagerFetch != 0 {
		t.Fatalf("cache: %+v", c.Cache)
	}
	if d := Default(); !d.Cache.MaxSize.IsZero() || d.Cache.EagerFetch != 4 {
		t.Fatalf("defaults: %+v", d.Cache)
	}
	for in, want := range map[string]Size{
		"1000": {Bytes: 1000}, "512MB": {Bytes: 512e6}, "1.5GiB": {Bytes: 3 << 29}, "4 MiB": {Bytes: 4 << 20},
		"10%": {Percent: 10}, "2.5%": {Percent: 2.5}, "7K": {Bytes: 7 << 10},
	} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "lots", "-1GiB", "0%", "101%", "GiB"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
	if _, err := Load(write(t, "[cache]\nmax_size = \"big\"\n")); err == nil || !strings.Contains(err.Error(), "big") {
		t.Errorf("bad max_size: %v", err)
	}
}

// TestLoadKeepsWhatTheFileSays: a key the file sets has the file's value, zero included;
// one it leaves out keeps its default; values the daemon cannot honour are errors from
// Validate, never silently replaced.
func TestLoadKeepsWhatTheFileSays(t *testing.T) {
	def := Default()
	for _, tc := range []struct {
		name, body string
		check      func(c Config) bool
		invalid    bool // Validate refuses it
	}{
		{"tag_freshness 0s revalidates every request", "[cache]\ntag_freshness = \"0s\"\n",
			func(c Config) bool { return c.Cache.TagFreshness.Duration == 0 }, false},
		{"eager_fetch 0 is off", "[cache]\neager_fetch = 0\n",
			func(c Config) bool { return c.Cache.EagerFetch == 0 }, false},
		{"eager_fetch 2", "[cache]\neager_fetch = 2\n",
			func(c Config) bool { return c.Cache.EagerFetch == 2 }, false},
		{"unset keys keep their defaults", "[cache]\nlist_ttl = \"1m\"\n",
			func(c Config) bool {
				return c.Cache.ListTTL.Duration == time.Minute && c.Cache.TagFreshness == def.Cache.TagFreshness &&
					c.Cache.EagerFetch == 4 && c.Cache.MaxManifestSize == def.Cache.MaxManifestSize &&
					c.Listen == def.Listen && len(c.Registries) == len(DefaultRegistries)
			}, false},
		{"empty default_registry: requests naming none are refused", "default_registry = \"\"\n",
			func(c Config) bool { return c.DefaultRegistry == "" }, false},
		{"registries replace the defaults whole", "[[registry]]\nname = \"quay.io\"\n",
			func(c Config) bool {
				return len(c.Registries) == 1 && c.Registries[0].Name == "quay.io" && c.Registries[0].Endpoints[0] == "https://quay.io"
			}, false},
		{"list_ttl 0s", "[cache]\nlist_ttl = \"0s\"\n", nil, true},
		{"orphan_grace 0s", "[cache]\norphan_grace = \"0s\"\n", nil, true},
		{"max_manifest_size 0", "[cache]\nmax_manifest_size = 0\n", nil, true},
		{"negative tag_freshness", "[cache]\ntag_freshness = \"-1s\"\n", nil, true},
		{"negative eager_fetch", "[cache]\neager_fetch = -1\n", nil, true},
		{"empty listen", "listen = \"\"\n", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(write(t, tc.body))
			if err != nil {
				t.Fatal(err)
			}
			err = c.Validate()
			if tc.invalid {
				if err == nil {
					t.Fatalf("accepted: %+v", c.Cache)
				}
				return
			}
			if err != nil || !tc.check(c) {
				t.Fatalf("%+v, %v", c, err)
			}
		})
	}
}

func TestSizeRoundTrips(t *testing.T) {
	for _, in := range []string{"20GiB", "512MB", "1000", "1.5GiB", "7K", "10%", "2.5%", "3TiB", "1"} {
		s, err := ParseSize(in)
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParseSize(s.String())
		if err != nil || back != s {
			t.Errorf("%s -> %q -> %+v, %v; want %+v", in, s.String(), back, err, s)
		}
	}
}

// Registry names reach the daemon from three places, and each one becomes a route, a key
// in the index and, with no endpoint given, the host of a URL the daemon dials with the
// registry's credentials. All three take the rule install uses (internal/regname): a
// lower-case host[:port] and nothing else. Before, ".." and "Docker.io" were taken.
func TestRegistryNames(t *testing.T) {
	bad := []string{
		"..",
		".",
		"../etc",
		"a/b",
		"docker.io/library",
		"docker.io.",
		"a..b",
		"Docker.io",
		"GHCR.IO:443",
		"a_b.io",
		"_default",
		"host:",
		"host:0",
		"host:65536",
		"host:05000",
		"::1",
		"[fe80::1%eth0]",
		"[::1]x",
		"user@host",
		"host?x",
		"host#x",
		"a b",
		"ho\nst",
		"ho\x00st",
		"%2e%2e",
		"1.2.3.04",
		"dоcker.io", // Cyrillic o
		strings.Repeat("a", 64) + ".io",
		strings.Repeat("abcdefgh.", 29) + "io", // 263 characters, every label short
	}
	good := []string{"docker.io", "localhost:5000", "127.0.0.1:5000", "[::1]:5000", "registry.k8s.io"}
	// tomlString quotes s as a TOML basic string; JSON's escapes are all valid TOML.
	tomlString := func(s string) string {
		b, _ := json.Marshal(s)
		return string(b)
	}
	routes := []struct {
		name string
		load func(t *testing.T, reg string) error
	}{
		{"[[registry]] name", func(t *testing.T, reg string) error {
			c, err := Load(write(t, "[[registry]]\nname = "+tomlString(reg)+"\n"))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			return c.Validate()
		}},
		{"--upstream", func(t *testing.T, reg string) error {
			c := Default()
			if err := c.SetUpstreams([]string{reg + "=http://127.0.0.1:1"}); err != nil {
				if !strings.Contains(err.Error(), "--upstream") {
					t.Errorf("error %q does not name the flag", err)
				}
				return err
			}
			return c.Validate()
		}},
		{"default_registry", func(t *testing.T, reg string) error {
			c, err := Load(write(t, "default_registry = "+tomlString(reg)+"\n"))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			err = c.Validate()
			if err == nil && !slices.Contains(DefaultRegistries, reg) && c.DefaultRegistry != "" {
				t.Errorf("default_registry %q kept though no such registry is configured", reg)
			}
			return err
		}},
	}
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) {
			for _, name := range bad {
				err := r.load(t, name)
				if err == nil {
					t.Errorf("%q accepted", name)
				} else if !strings.Contains(err.Error(), strconv.Quote(name)) {
					t.Errorf("%q: error %q does not name it", name, err)
				}
			}
			for _, name := range good {
				if err := r.load(t, name); err != nil {
					t.Errorf("%q refused: %v", name, err)
				}
			}
		})
	}
}

// TestFetchAndFleetKeys: the ranged-fetch and fleet keys take what the daemon can honour
// and refuse the rest with the key's name.
func TestFetchAndFleetKeys(t *testing.T) {
	for _, tc := range []struct {
		body string
		bad  string // a word the error must carry; "" for valid
	}{
		{"[cache]\nfetch_concurrency = 1\nfetch_chunk_size = \"64KiB\"\n", ""},
		{"[cache]\nfetch_concurrency = 8\nfetch_chunk_size = \"64MiB\"\nupstream_connections = 2\n", ""},
		{"[cache]\nfetch_concurrency = 0\n", "fetch_concurrency"},
		{"[cache]\nfetch_concurrency = 65\n", "fetch_concurrency"},
		{"[cache]\nfetch_chunk_size = \"1KiB\"\n", "fetch_chunk_size"},
		{"[cache]\nfetch_chunk_size = \"65MiB\"\n", "fetch_chunk_size"},
		{"[cache]\nfetch_chunk_size = \"10%\"\n", "fetch_chunk_size"},
		{"[cache]\nupstream_connections = 0\n", "upstream_connections"},
		{"[fleet]\npeer_listen = \"127.0.0.1:5001\"\ngossip_listen = \"127.0.0.1:7946\"\nkey_file = \"/k\"\n", ""},
		{"[fleet]\npeer_listen = \"127.0.0.1:5001\"\ngossip_listen = \"127.0.0.1:7946\"\n", "key_file"},
		{"[fleet]\npeer_listen = \"127.0.0.1:5001\"\nkey_file = \"/k\"\n", "gossip_listen"},
		{"[fleet]\npeer_listen = \"5001\"\ngossip_listen = \"127.0.0.1:7946\"\nkey_file = \"/k\"\n", "peer_listen"},
		{"[fleet]\ngossip_listen = \"127.0.0.1:7946\"\njoin = [\"a:1\"]\n", "peer_listen"},
		{"[fleet]\npeer_listen = \"127.0.0.1:5001\"\ngossip_listen = \"127.0.0.1:7946\"\nkey_file = \"/k\"\npeer_tls_cert = \"/c\"\n", "peer_tls_key"},
		{"[fleet]\npeer_listen = \"127.0.0.1:5001\"\nbogus = 1\n", "bogus"},
	} {
		c, err := Load(write(t, tc.body))
		if err == nil {
			err = c.Validate()
		}
		switch {
		case tc.bad == "" && err != nil:
			t.Errorf("%q: %v", tc.body, err)
		case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad)):
			t.Errorf("%q: error %v, want one naming %s", tc.body, err, tc.bad)
		}
	}
}
