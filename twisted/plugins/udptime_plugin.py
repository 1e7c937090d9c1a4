from twisted.application.service import ServiceMaker

udptime = ServiceMaker("udptime", "udptime.tap", "A UDP time server.", "udptime")
