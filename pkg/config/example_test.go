package config

import (
	"os"
	"strings"
	"testing"
)

// The shipped example must stay loadable and valid.
func TestExampleConfig(t *testing.T) {
	c, err := Load("../../examples/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.Registries) != 4 || c.Registries[0].Endpoints[0] != "https://registry-1.docker.io" {
		t.Fatalf("example registries: %+v", c.Registries)
	}
}

// The example's commented [fleet] table documents real keys: uncommented, it loads and
// validates.
func TestExampleFleetTable(t *testing.T) {
	b, err := os.ReadFile("../../examples/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "# [fleet]")
	if i < 0 {
		t.Fatal("the example has no [fleet] table")
	}
	var out []string
	for _, l := range strings.Split(s[i:], "\n") {
		if !strings.HasPrefix(l, "# ") {
			break
		}
		out = append(out, strings.TrimPrefix(l, "# "))
	}
	c, err := Load(write(t, strings.Join(out, "\n")+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if !c.Fleet.Enabled() || c.Fleet.KeyFile == "" || len(c.Fleet.Join) != 1 {
		t.Fatalf("fleet table: %+v", c.Fleet)
	}
}

// The example's commented trusted_hosts line is a real key of the registry it sits in.
func TestExampleTrustedHosts(t *testing.T) {
	b, err := os.ReadFile("../../examples/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "# trusted_hosts = ", "trusted_hosts = ", 1)
	if s == string(b) {
		t.Fatal("the example has no trusted_hosts line")
	}
	c, err := Load(write(t, s))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.Registries[0].TrustedHosts; len(got) != 1 || got[0] != "gitlab.corp.example" {
		t.Fatalf("docker.io trusted_hosts = %q", got)
	}
}
