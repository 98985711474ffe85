package fleet

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadKey(t *testing.T) {
	const hexKey = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF"
	want := []byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
		0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff}
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		wantErr string // substring; "" means success
	}{
		{"hex", hexKey, 0o600, ""},
		{"trailing newline", hexKey + "\n", 0o400, ""},
		{"surrounding spaces", "  " + hexKey + " \r\n", 0o600, ""},
		{"too short", hexKey[:62], 0o600, "want 64 hexadecimal digits"},
		{"too long", hexKey + "00", 0o600, "want 64 hexadecimal digits"},
		{"not hex", strings.Replace(hexKey, "00", "zz", 1), 0o600, "not hexadecimal"},
		{"raw 32 bytes", string(want), 0o600, "want 64 hexadecimal digits"},
		{"empty", "", 0o600, "want 64 hexadecimal digits"},
		{"group readable", hexKey, 0o640, "group or others"},
		{"world readable", hexKey, 0o604, "group or others"},
		{"group writable", hexKey, 0o620, "group or others"},
		{"huge", strings.Repeat("0", 4096), 0o600, "is not a key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "key")
			if err := os.WriteFile(p, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, tt.mode); err != nil {
				t.Fatal(err)
			}
			key, err := LoadKey(p)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("LoadKey: %v", err)
				}
				if !bytes.Equal(key, want) {
					t.Fatalf("key = %x, want %x", key, want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("LoadKey error = %v, want one containing %q", err, tt.wantErr)
			}
			// The key file's content is a secret: an error never quotes it.
			if tt.content != "" && strings.Contains(err.Error(), strings.TrimSpace(tt.content)) {
				t.Fatalf("error quotes the file: %v", err)
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		if _, err := LoadKey(filepath.Join(t.TempDir(), "nope")); err == nil {
			t.Fatal("LoadKey of a missing file succeeded")
		}
	})
	t.Run("directory", func(t *testing.T) {
		d := filepath.Join(t.TempDir(), "d")
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadKey(d); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("LoadKey of a directory: %v", err)
		}
	})
}

func TestDerivedKeysDiffer(t *testing.T) {
	key := bytes.Repeat([]byte{7}, KeySize)
	g, s := deriveKey(key, labelGossip), deriveKey(key, labelSign)
	if len(g) != 32 || len(s) != 32 {
		t.Fatalf("derived key lengths %d, %d; want 32 (memberlist takes 16, 24 or 32)", len(g), len(s))
	}
	if bytes.Equal(g, s) || bytes.Equal(g, key) || bytes.Equal(s, key) {
		t.Fatal("gossip, signing and fleet keys must all differ")
	}
	if !bytes.Equal(g, deriveKey(key, labelGossip)) {
		t.Fatal("derivation is not deterministic: members would disagree")
	}
}
