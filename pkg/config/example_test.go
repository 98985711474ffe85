package config

import "testing"

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
