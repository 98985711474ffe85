package fleet

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
)

// KeySize is the length of the fleet key in bytes.
const KeySize = 32

// Labels for the keys derived from the fleet key. One key serves two protocols; deriving a
// separate key for each means a weakness or a leak in one (memberlist's packet encryption,
// our request signatures) hands an attacker nothing usable against the other.
const (
	labelGossip = "node-mirror fleet gossip v1"
	labelSign   = "node-mirror fleet peer-auth v1"
)

// LoadKey reads a fleet key file: 64 hexadecimal digits (32 bytes), surrounding whitespace
// ignored, as `openssl rand -hex 32` writes it. The file must be readable and writable by
// its owner only: the key admits a node to the fleet and lets it read every blob any member
// has cached, private layers included.
func LoadKey(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("fleet key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("fleet key %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("fleet key %s: mode %04o lets group or others access it; make it readable by its owner only (chmod 600, or defaultMode: 0400 for a Kubernetes Secret)", path, perm)
	}
	if fi.Size() > 1024 {
		return nil, fmt.Errorf("fleet key %s: %d bytes is not a key: want %d hexadecimal digits", path, fi.Size(), 2*KeySize)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("fleet key: %w", err)
	}
	key, err := ParseKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("fleet key %s: %w", path, err)
	}
	return key, nil
}

// ParseKey decodes a hex key as LoadKey does, without the file checks. The error never
// quotes the input, which may be a secret with a typo.
func ParseKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if len(s) != 2*KeySize {
		return nil, fmt.Errorf("want %d hexadecimal digits (%d bytes), got %d characters", 2*KeySize, KeySize, len(s))
	}
	key, err := hex.DecodeString(s)
	if err != nil {
		return nil, errors.New("not hexadecimal: want only the digits 0-9 and a-f")
	}
	return key, nil
}

// deriveKey returns HMAC-SHA256(key, label): a 32-byte key for one purpose.
func deriveKey(key []byte, label string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label))
	return m.Sum(nil)
}
