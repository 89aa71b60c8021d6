package identity

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
)

// MinKeySize is the shortest pre-shared key accepted, in bytes of key (not
// of its hex text).
const MinKeySize = 32

// Purposes of keys derived from a pre-shared key: a key for one purpose
// opens nothing of another.
const (
	PurposeStream    = "ax replication stream v2"
	PurposeHeartbeat = "ax heartbeat v2"
	PurposeWitness   = "ax witness v2"
)

// ReadKeyFile reads a pre-shared key: a file readable by its owner only,
// holding the key as hex (what `axctl pki psk` and the lab write) or as raw
// bytes; at least MinKeySize bytes of key.
func ReadKeyFile(path string) ([]byte, error) {
	if err := CheckPrivate(path); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("identity: pre-shared key: %w", err)
	}
	key := data
	if t := bytes.TrimSpace(data); len(t) > 0 && len(t)%2 == 0 {
		if k, err := hex.DecodeString(string(t)); err == nil {
			key = k
		}
	}
	if len(key) < MinKeySize {
		return nil, fmt.Errorf("identity: the pre-shared key in %s has %d bytes, need at least %d (make one with: axctl pki psk %s)", path, len(key), MinKeySize, path)
	}
	return key, nil
}

// DeriveKey returns the 32-byte key for purpose derived from psk (HKDF-SHA256).
func DeriveKey(psk []byte, purpose string) []byte {
	k, err := hkdf.Key(sha256.New, psk, nil, purpose, 32)
	if err != nil {
		panic(err) // only for lengths HKDF cannot make
	}
	return k
}
