/* The provider's version: its OpenSSL identity and its HELLO to the broker. */
#ifndef TPMBROKER_VERSION_H
#define TPMBROKER_VERSION_H

#define TPMBROKER_VERSION "0.1.0"

#endif
